"""Read a GGUF file's header key/values with the standard library only.

The API uses it to accept a GGUF upload as a source (and say which architecture and file type
it holds) without importing numpy or gguf-py; tensor data is never read.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"
# GGUF value types: uint8, int8, uint16, int16, uint32, int32, float32, bool, string, array,
# uint64, int64, float64.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this (token lists, merges) are skipped, not returned: only their length.
_MAX_ARRAY_KEPT = 64
_MAX_STRING = 64 * 1024 * 1024


class NotGGUF(ValueError):
    pass


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise NotGGUF("the GGUF header ends early")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    length = _read(f, "<Q")
    if length > _MAX_STRING:
        raise NotGGUF(f"a GGUF string claims {length} bytes")
    data = f.read(length)
    if len(data) != length:
        raise NotGGUF("the GGUF header ends early")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        item_type, count = _read(f, "<I"), _read(f, "<Q")
        items = [_value(f, item_type) for _ in range(count)]
        return items if count <= _MAX_ARRAY_KEPT else {"array_length": count}
    raise NotGGUF(f"unknown GGUF value type {vtype}")


def read_metadata(path: Path) -> dict[str, Any]:
    """Every key/value of the header (long arrays summarised by their length)."""
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise NotGGUF(f"{path.name} is not a GGUF file (no GGUF magic)")
        version = _read(f, "<I")
        if version not in (2, 3):
            raise NotGGUF(f"unsupported GGUF version {version}")
        tensor_count, kv_count = _read(f, "<Q"), _read(f, "<Q")
        meta: dict[str, Any] = {"gguf.version": version, "gguf.tensor_count": tensor_count}
        for _ in range(kv_count):
            key = _string(f)
            meta[key] = _value(f, _read(f, "<I"))
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


def summary(path: Path) -> dict[str, Any]:
    """What a catalog wants to know about a GGUF source."""
    meta = read_metadata(path)
    file_type = FILE_TYPE_NAMES.get(meta.get("general.file_type", 0), "unknown")
    return {
        "format": "gguf",
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "file_type": file_type,
        "quantized": file_type not in LOSSLESS_FILE_TYPES,
        "tensor_count": meta["gguf.tensor_count"],
        "split_count": meta.get("split.count"),
    }
