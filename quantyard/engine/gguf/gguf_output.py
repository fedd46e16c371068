"""Write GGUF files header-first and tensor data streamed, the way llama.cpp lays them out.

All tensor infos (name, shape, type, offset) are known before any data is written, so the file
is written front to back once: no seeking back, no temporary file, and only the tensor being
encoded is in memory. Key-value pairs are passed as encoded bytes, so metadata copied from an
input file keeps its exact types.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3

# enum gguf_type
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _string(str(value))
    return struct.pack(_SCALAR[vtype], value)


def encode_kv(key: str, vtype: int, value, sub_type: int | None = None) -> bytes:
    """One key-value pair; arrays (vtype ARRAY) take `sub_type` and a sequence."""
    head = _string(key) + struct.pack("<I", vtype)
    if vtype != ARRAY:
        return head + _value(vtype, value)
    if sub_type is None:
        raise ValueError(f"array {key!r} needs its item type")
    items = list(value)
    body = b"".join(_value(sub_type, v) for v in items)
    return head + struct.pack("<IQ", sub_type, len(items)) + body


def encode_auto(key: str, value) -> bytes:
    """A Python value with the GGUF type llama.cpp's tools use for it: str, bool, non-negative
    int -> u32 (i64 when it does not fit), float -> f32, list of str -> string array."""
    if isinstance(value, bool):
        return encode_kv(key, BOOL, value)
    if isinstance(value, int):
        return encode_kv(key, UINT32 if 0 <= value < 2**32 else INT64, value)
    if isinstance(value, float):
        return encode_kv(key, FLOAT32, value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return encode_kv(key, ARRAY, value, STRING)
    return encode_kv(key, STRING, str(value))


@dataclass(frozen=True)
class TensorEntry:
    name: str
    ne: tuple[int, ...]  # ggml order, trailing 1s already dropped (ggml_n_dims)
    type_id: int
    nbytes: int


def pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def info_size(t: TensorEntry) -> int:
    return 8 + len(t.name.encode()) + 4 + 8 * len(t.ne) + 4 + 8


def header_size(kv: Sequence[bytes], tensors: Sequence[TensorEntry], alignment: int) -> int:
    """Bytes before the first tensor's data (header, KV, tensor infos, padding)."""
    return pad(4 + 4 + 8 + 8 + sum(len(b) for b in kv) + sum(info_size(t) for t in tensors), alignment)


def file_size(kv: Sequence[bytes], tensors: Sequence[TensorEntry], alignment: int) -> int:
    return header_size(kv, tensors, alignment) + sum(pad(t.nbytes, alignment) for t in tensors)


def write_header(f: BinaryIO, kv: Sequence[bytes], tensors: Sequence[TensorEntry], alignment: int) -> None:
    """Header, metadata and tensor infos, padded so the data section starts aligned."""
    f.write(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv)))
    for blob in kv:
        f.write(blob)
    offset = 0
    for t in tensors:
        f.write(_string(t.name) + struct.pack("<I", len(t.ne)))
        f.write(struct.pack(f"<{len(t.ne)}Q", *t.ne))
        f.write(struct.pack("<IQ", t.type_id, offset))
        offset += pad(t.nbytes, alignment)
    f.write(b"\0" * (pad(f.tell(), alignment) - f.tell()))


def write_padding(f: BinaryIO, written: int, alignment: int) -> None:
    """Zeros after a tensor's `written` bytes, up to the next aligned offset."""
    f.write(b"\0" * (pad(written, alignment) - written))


__all__ = ["encode_kv", "encode_auto", "TensorEntry", "header_size", "file_size", "write_header",
           "write_padding", "pad", "STRING", "UINT32", "UINT16", "INT32", "ARRAY", "BOOL"]
