"""Fuzz target: both GGUF header readers, on the same bytes.

- quantyard/gguf_header.py (the API reads an uploaded GGUF's key/values with it): only NotGGUF
  may escape;
- quantyard/engine/gguf/gguf_layout.py (the worker reads key/values and tensor infos): only
  InvalidModel may escape, and an accepted layout's data section starts inside the file.
"""

from __future__ import annotations

import _harness
import atheris

with atheris.instrument_imports(include=["quantyard"]):
    from quantyard import gguf_header
    from quantyard.engine.errors import InvalidModel
    from quantyard.engine.gguf import gguf_layout

MAX_LEN = 64 * 1024
scratch = _harness.Scratch()


class _Refused(Exception):
    """Both readers refused the input (each with its own documented error)."""


def parse(data: bytes) -> None:
    path = scratch.write(data, "model.gguf")
    refused = 0
    try:
        gguf_header.summary(path)
    except gguf_header.NotGGUF:
        refused += 1
    try:
        layout = gguf_layout.read_layout(path)
    except InvalidModel:
        refused += 1
    else:
        assert layout.alignment > 0, "finding: accepted a non-positive alignment"
        assert 0 < layout.data_offset, "finding: data section before the header"
    if refused == 2:
        raise _Refused


if __name__ == "__main__":
    allowed = (_Refused,)
    _harness.main(_harness.guarded(parse, allowed, max_len=MAX_LEN), max_len=MAX_LEN, dictionary="gguf.dict")
