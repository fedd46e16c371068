"""Fuzz target: the safetensors header parser (quantyard/engine/hf/safetensors_header.py).

Only InvalidModel may escape. Beyond that, what the parser accepts must hold: every tensor lies
inside the file, its byte span matches dtype x shape, and no two tensors overlap."""

from __future__ import annotations

import math

import _harness
import atheris

with atheris.instrument_imports(include=["quantyard"]):
    from quantyard.engine.errors import InvalidModel
    from quantyard.engine.hf import safetensors_header as st

MAX_LEN = 64 * 1024
scratch = _harness.Scratch()


def parse(data: bytes) -> None:
    path = scratch.write(data, "model.safetensors")
    tensors, metadata = st.read_safetensors_header(path)
    assert isinstance(metadata, dict)
    spans = []
    for ref in tensors.values():
        assert 0 <= ref.offset and ref.offset + ref.nbytes <= len(data), f"finding: {ref.name} outside the file"
        assert ref.nbytes == math.prod(ref.shape) * st.DTYPE_SIZES[ref.dtype], f"finding: {ref.name} size"
        if ref.nbytes:
            spans.append((ref.offset, ref.offset + ref.nbytes))
    spans.sort()
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        assert begin >= end, "finding: accepted overlapping tensors"


if __name__ == "__main__":
    allowed = (InvalidModel,)
    _harness.main(_harness.guarded(parse, allowed, max_len=MAX_LEN), max_len=MAX_LEN, dictionary="safetensors.dict")
