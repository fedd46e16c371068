"""Fuzz target: the vetting of program sources (quantyard/engine/onnx/program.py) on zip bytes.

The bytes are a folder's one model file (model.pt2); describe() classifies it (and refuses
pickles), then the vetting that runs before torch.export.load / torch.jit.load is applied to
what describe() accepted. Only InvalidModel may escape; nothing is ever loaded here, so a marker
file written by an input would be a finding too.
"""

from __future__ import annotations

import _harness
import atheris

with atheris.instrument_imports(include=["quantyard"]):
    from quantyard.engine.errors import InvalidModel
    from quantyard.engine.onnx import program

import torch  # noqa: F401  (imported once, outside the loop: the vetting uses torch.load)

MAX_LEN = 256 * 1024
scratch = _harness.Scratch()
MARKER = scratch.root / "pwned"


def parse(data: bytes) -> None:
    root = scratch.fresh_dir("prog")
    (root / "model.pt2").write_bytes(data)
    try:
        src = program.describe(root)
        if src.kind == "torch.export":
            program.vet_pt2(src.path)
        elif src.kind == "torchscript":
            program.vet_torchscript(src.path)
    finally:
        assert not MARKER.exists(), "finding: an input ran code while being vetted"


if __name__ == "__main__":
    allowed = (InvalidModel,)
    _harness.main(_harness.guarded(parse, allowed, max_len=MAX_LEN), max_len=MAX_LEN, dictionary="program.dict")
