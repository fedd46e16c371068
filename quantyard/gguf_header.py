"""Read a GGUF file's header key/values with the standard library only.

The API uses it to accept a GGUF upload as a source (and say which architecture and file type
it holds) without importing numpy or gguf-py; tensor data is never read. The parsing is the
engine's (engine.gguf.gguf_layout, stdlib only): one reader, one set of caps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantyard.engine.errors import InvalidModel
from quantyard.engine.gguf.gguf_layout import read_layout

MAGIC = b"GGUF"
# Arrays longer than this (token lists, merges) are summarised by their length, not returned.
_MAX_ARRAY_KEPT = 64


class NotGGUF(ValueError):
    pass


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def read_metadata(path: Path) -> dict[str, Any]:
    """Every key/value of the header (long arrays summarised by their length), read by the
    engine's strict layout reader (every count and length capped before it costs memory)."""
    try:
        layout = read_layout(Path(path), keep_raw=False)
    except InvalidModel as exc:
        raise NotGGUF(exc.message) from None
    meta: dict[str, Any] = {"gguf.version": layout.version, "gguf.tensor_count": len(layout.tensors)}
    for key, kv in layout.kv.items():
        long = kv.array_length is not None and (kv.value is None or kv.array_length > _MAX_ARRAY_KEPT)
        meta[key] = {"array_length": kv.array_length} if long else kv.value
    return meta


# llama_ftype values (llama.h) whose weights are already quantized, by name.
FILE_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}
LOSSLESS_FILE_TYPES = {"F32", "F16", "BF16"}


def _typed(meta: dict[str, Any], key: str, kind: type, default=None):
    """A header value of the type the field must have; a field of another type (an array where
    a name belongs) is refused naming it, so nothing downstream trips over it."""
    value = meta.get(key, default)
    if value is not None and (type(value) is not kind):
        raise NotGGUF(f"{key} must be a {kind.__name__}, not {type(value).__name__}")
    return value


def summary(path: Path) -> dict[str, Any]:
    """What a catalog wants to know about a GGUF source."""
    meta = read_metadata(path)
    file_type = FILE_TYPE_NAMES.get(_typed(meta, "general.file_type", int, 0), "unknown")
    return {
        "format": "gguf",
        "architecture": _typed(meta, "general.architecture", str),
        "name": _typed(meta, "general.name", str),
        "file_type": file_type,
        "quantized": file_type not in LOSSLESS_FILE_TYPES,
        "tensor_count": meta["gguf.tensor_count"],
        "split_count": _typed(meta, "split.count", int),
    }
