"""The part of a program conversion that touches the upload with torch, run in the sandbox.

`export_in_child` runs in quantyard.engine.sandbox's child: it vets and loads the .pt2 or
TorchScript program, exports it to ONNX fp32 into the folder it was given, and computes the
program's outputs on the validation feeds (the reference). It answers JSON (the input specs,
the exporter's notes, which .npy file holds which reference output); the parent checks all of
it as untrusted (`specs_from_child`, `load_references`) and never unpickles anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from ..errors import InvalidModel
from .program import INPUTS_FILE, SETS, Specs, parse_specs, sample_inputs

VALIDATION_SEED = 7  # program_convert.validate draws its feeds with this seed
MAX_AXIS_SIZE = 1 << 20


def feeds_digest(feeds: Mapping, names) -> str:
    """Which feeds these are: the reference outputs are looked up by it."""
    h = hashlib.sha256()
    for name in names:
        a = feeds[name]
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def export_in_child(*, root: str, params: dict, fp32: str, opset: int, refs: str) -> dict:
    """Load, export to `fp32`, and write the reference outputs into `refs` (ref-<set>-<i>.npy)."""
    import numpy as np
    import torch

    from .program import describe, load_torch
    from .program_convert import Prepared, _flat_numpy, _specs_for, export_program

    src = describe(Path(root))
    program = load_torch(src)
    specs = _specs_for(src, params, program=program)

    def reference(feeds: dict) -> list:
        with torch.no_grad():
            return _flat_numpy(program.module(*[torch.from_numpy(feeds[n]) for n in specs.names]))

    prep = Prepared(src, specs, reference, program)
    info = export_program(prep, Path(fp32), opset)
    out = Path(refs)
    references = []
    for index in range(SETS):
        feeds = sample_inputs(specs, index, seed=VALIDATION_SEED)
        files = []
        for i, value in enumerate(reference(feeds)):
            name = f"ref-{index}-{i}.npy"
            np.save(out / name, np.ascontiguousarray(value), allow_pickle=False)
            files.append(name)
        references.append({"digest": feeds_digest(feeds, specs.names), "files": files})
    specs_json = {"inputs": specs.to_json(), "axes": {a: list(s) for a, s in specs.axes.items()},
                  "batch_axes": sorted(specs.batch_axes)}
    return {"specs": specs_json, "info": info, "references": references}


# ---------------------------------------------------------------- the parent's side


def specs_from_child(raw, model_file: str) -> Specs:
    """The child's specs, re-parsed as strictly as an inputs.json (the child is not trusted)."""
    bad = InvalidModel(f"loading {model_file} gave unusable input specs", details={"file": model_file})
    if not isinstance(raw, dict):
        raise bad
    specs, _ = parse_specs(raw.get("inputs"), source=INPUTS_FILE)
    axes, batch = raw.get("axes"), raw.get("batch_axes")
    named = {d for s in specs for d in s.shape if isinstance(d, str)}
    if not isinstance(axes, dict) or set(axes) != named or not isinstance(batch, list) or not set(batch) <= named:
        raise bad
    for sizes in axes.values():
        ok = isinstance(sizes, list) and len(sizes) == SETS
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_AXIS_SIZE for v in sizes):
            raise bad
    return Specs(tuple(specs), {a: tuple(s) for a, s in axes.items()}, frozenset(batch))


def load_references(raw, folder: Path, model_file: str) -> dict[str, list]:
    """digest -> the reference outputs, read as plain arrays (np.load never unpickles here)."""
    import numpy as np

    bad = InvalidModel(f"loading {model_file} gave no usable reference outputs", details={"file": model_file})
    if not isinstance(raw, list) or len(raw) != SETS:
        raise bad
    out = {}
    for item in raw:
        files = item.get("files") if isinstance(item, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, str) and f.startswith("ref-") and "/" not in f
                                                  for f in files):
            raise bad
        try:
            out[str(item.get("digest"))] = [np.load(folder / f, allow_pickle=False) for f in files]
        except (OSError, ValueError):
            raise bad from None
    return out


__all__ = ["VALIDATION_SEED", "export_in_child", "feeds_digest", "load_references", "specs_from_child"]
