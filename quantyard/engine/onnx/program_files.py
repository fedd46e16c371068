"""Which file makes a folder a "program source", and what kind of file it is (stdlib only).

A program source is a folder without config.json holding exactly one model file: a
torch.export archive (.pt2), a TorchScript archive (.pt/.pth), or an .onnx graph (+ its
external data). The kind is read from the bytes, never trusted from the name: .pt2 and
TorchScript files are zips whose member names differ, and a plain pickle or a torch.save zip
(pickled Python objects, no program) is recognised so it can be refused without loading it.

Only the standard library here: the API classifies uploads with it and must not import torch.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

MODEL_SUFFIXES = (".pt2", ".pt", ".pth", ".onnx")
INPUTS_FILE = "inputs.json"

# kinds a program source can be; the other answers of classify() are refusals
PROGRAM_KINDS = ("torch.export", "torchscript", "onnx")
PICKLE_KINDS = ("pickle", "torch.save")


def candidates(names) -> list[str]:
    """File names that look like a model file (by suffix; the content decides later)."""
    return sorted(n for n in names if n.lower().endswith(MODEL_SUFFIXES))


def _zip_kind(names: list[str], read) -> str:
    """torch.export.save and torch.jit.save both write `<archive>/...` zips: the former has an
    `archive_format` member saying "pt2", the latter `code/` (TorchScript source) and
    `constants.pkl`; torch.save writes only `data.pkl` (a pickle) and its tensors."""
    for name in names:
        at_top = name.rsplit("/", 1)[-1] == "archive_format" and name.count("/") <= 1
        if at_top and read(name)[:16].strip() == b"pt2":
            return "torch.export"
    tops = {n.split("/", 1)[0] for n in names}
    for top in tops:
        has_code = any(n.startswith(f"{top}/code/") for n in names)
        if has_code and (f"{top}/constants.pkl" in names or f"{top}/data.pkl" in names):
            return "torchscript"
    if any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names):
        return "torch.save"
    return "unknown"


def classify(path: Path) -> str:
    """"torch.export", "torchscript", "onnx", "pickle", "torch.save" or "unknown"."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                return _zip_kind(zf.namelist(), lambda n: zf.read(n) if zf.getinfo(n).file_size < 64 else b"")
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError,
                RuntimeError):  # RuntimeError: zipfile's "is encrypted, password required"
            return "unknown"  # corrupt: describe() refuses it as no known kind
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode: torch.save's legacy format, pickle.dump
        return "pickle"
    if path.suffix.lower() == ".onnx":
        return "onnx"  # protobuf has no magic; the ONNX loader checks it properly
    return "unknown"


def model_file(root: Path) -> str | None:
    """The program's model file in a folder without config.json; None when it isn't one.
    Several candidates are the caller's error to report (see describe in program.py)."""
    root = Path(root)
    if (root / "config.json").is_file() or not root.is_dir():
        return None
    found = candidates(p.name for p in root.iterdir() if p.is_file())
    return found[0] if found else None


def is_program_dir(root: Path) -> bool:
    return model_file(root) is not None


__all__ = ["MODEL_SUFFIXES", "INPUTS_FILE", "PROGRAM_KINDS", "PICKLE_KINDS", "candidates", "classify",
           "model_file", "is_program_dir"]
