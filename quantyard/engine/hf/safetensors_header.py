"""A small, strict safetensors header parser (stdlib only: preflight must stay cheap).

Layout: 8-byte little-endian header length N, then N bytes of JSON mapping tensor names to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the byte after the header),
plus an optional "__metadata__" dict. Every claim in the header is checked against the file's
size so a truncated or corrupt file is rejected before any tensor is touched.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidModel
from ..jsonsafe import load_json_capped

# Bytes per element of every dtype the format defines; conversion supports a subset (FLOAT_DTYPES).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
# A header larger than this is not a model we want to parse (the reference reader allows 100 MB;
# a 3,000-tensor model's header is ~300 KB).
MAX_HEADER_BYTES = 32 * 1024 * 1024
MAX_TENSORS = 1 << 17
MAX_DIMS = 8
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live; reading them is someone else's job."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def _fail(path: Path, what: str) -> InvalidModel:
    return InvalidModel(f"corrupt safetensors file {path.name}: {what}", details={"file": path.name})


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool: JSON true is no size


def _read_header_bytes(path: Path, file_size: int) -> tuple[bytes, int]:
    if file_size < 8:
        raise _fail(path, f"file is {file_size} bytes, too short for the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
            raise _fail(path, f"header length {n} does not fit a file of {file_size} bytes")
        return f.read(n), 8 + n


def _parse_entry(path: Path, name: str, entry: object, data_start: int, file_size: int) -> TensorRef:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _fail(path, f"tensor {name!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _fail(path, f"tensor {name!r} has unknown dtype {str(dtype)[:40]!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(d) and 0 <= d <= _INT64_MAX for d in shape)):
        raise _fail(path, f"tensor {name!r} has invalid shape {str(shape)[:200]}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and 0 <= o <= _INT64_MAX for o in offsets)
            or not offsets[0] <= offsets[1]):
        raise _fail(path, f"tensor {name!r} has invalid data_offsets {str(offsets)[:200]}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if expected > _INT64_MAX:
        raise _fail(path, f"tensor {name!r} of shape {shape} would need {expected} bytes, past 2^63")
    if end - begin != expected:
        raise _fail(path, f"tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {expected}")
    if data_start + end > file_size:
        raise _fail(path, f"tensor {name!r} ends at byte {data_start + end}, past the end of the file ({file_size})")
    return TensorRef(name, path, dtype, tuple(shape), data_start + begin, expected)


def _check_layout(path: Path, refs: list[TensorRef], data_start: int, file_size: int) -> None:
    """Tensors tile the data section exactly, as the reference reader requires (it raises
    SafetensorError on a gap, an overlap or trailing bytes, far later, while loading)."""
    last_end, last_name = data_start, None
    for ref in sorted(refs, key=lambda r: (r.offset, r.nbytes)):
        if ref.offset < last_end:
            raise _fail(path, f"tensors {last_name!r} and {ref.name!r} overlap")
        if ref.offset > last_end:
            raise _fail(path, f"{ref.offset - last_end} bytes before tensor {ref.name!r} belong to no tensor")
        last_end, last_name = ref.offset + ref.nbytes, ref.name
    if last_end != file_size:
        raise _fail(path, f"{file_size - last_end} bytes after the last tensor belong to no tensor")


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Parse and validate one file's header; return (tensors by name, __metadata__)."""
    path = Path(path)
    file_size = path.stat().st_size
    raw, data_start = _read_header_bytes(path, file_size)
    try:  # depth 3 is all the format has: {name: {"shape": [...]}}
        header = load_json_capped(raw, name=path.name, max_bytes=MAX_HEADER_BYTES, max_depth=3)
    except InvalidModel as e:
        raise _fail(path, f"header {e.message.removeprefix(path.name + ' ')}") from None
    if not isinstance(header, dict):
        raise _fail(path, "header JSON is not an object")
    if len(header) > MAX_TENSORS + 1:
        raise _fail(path, f"header lists {len(header)} tensors (at most {MAX_TENSORS})")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ is not an object of strings")
    refs = [_parse_entry(path, name, entry, data_start, file_size) for name, entry in header.items()]
    _check_layout(path, refs, data_start, file_size)
    return {r.name: r for r in refs}, metadata


__all__ = ["TensorRef", "read_safetensors_header", "DTYPE_SIZES", "FLOAT_DTYPES"]
