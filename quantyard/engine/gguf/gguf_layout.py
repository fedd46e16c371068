"""A fast, strict reader of a GGUF file's layout: key/values (raw bytes and decoded values) and
tensor infos. Tensor data is not touched. Stdlib only: the API reads uploads with it too
(quantyard.gguf_header).

gguf-py's GGUFReader builds a numpy view for every element of every array, which takes seconds
on a real vocabulary (150,000 tokens and merges) and dominated requantization time; here long
arrays are skipped over with plain `struct` reads and only short values are decoded.

The header comes from an upload, so every count and length is checked against a cap and
against the bytes left in the file before anything is allocated for it (a header claiming 2^63
keys, a 60M-item array or a 2^63-byte string costs nothing), and every tensor must fit the file
with a known type, at most 4 dimensions and an aligned offset. Failures are InvalidModel naming
the file and the field.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ..errors import InvalidModel
from .ggml_types import GGML_TYPES_BY_ID

# GGUF value types: uint8, int8, uint16, int16, uint32, int32, float32, bool, string, array,
# uint64, int64, float64.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_SIZES = {t: struct.calcsize(f) for t, f in _SCALARS.items()}
_STRING, _ARRAY = 8, 9
_INTEGERS = (0, 1, 2, 3, 4, 5, 10, 11)
# Arrays up to this length are decoded (hparams, per-layer lists); longer ones (vocab) are not.
MAX_DECODED_ARRAY = 1024

# Caps, far above any real model (a 262k-token vocabulary, ~50 keys, a few thousand tensors).
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 16
MAX_ARRAY_ITEMS = 1 << 22
MAX_STRING_BYTES = 1 << 24  # a value (chat templates are a few KB)
# The whole key/value + tensor-info section (a 262k vocabulary with merges is ~30 MB): bounds the
# raw bytes the engine keeps; and what is decoded into Python values (short arrays, strings).
MAX_HEADER_BYTES = 256 << 20
MAX_DECODED_BYTES = 32 << 20
MAX_NAME_BYTES = 1024  # a key or tensor name (ggml allows 63)
MAX_ARRAY_NESTING = 2  # an array of arrays, at most
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 20
_INT64_MAX = (1 << 63) - 1
# (values per block, bytes per block) of the ggml types a tensor may have: the table the
# engine knows plus the plain integer/float types and the ternary and MXFP4 blocks.
_BLOCKS = {t.id: (t.block_size, t.type_size) for t in GGML_TYPES_BY_ID.values()}
_BLOCKS.update({24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
                34: (256, 54), 35: (256, 66), 39: (32, 17)})


@dataclass(frozen=True)
class KeyValue:
    key: str
    raw: bytes  # the whole pair as stored (key, type, value): copied verbatim into outputs
    value: object  # decoded; None for an array longer than MAX_DECODED_ARRAY
    array_length: int | None = None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order (ne[0] = row length)
    type_id: int
    offset: int  # from the start of the data section
    nbytes: int = 0


@dataclass(frozen=True)
class Layout:
    version: int
    kv: dict[str, KeyValue]
    tensors: list[TensorInfo]
    data_offset: int  # where the data section starts in the file

    @property
    def alignment(self) -> int:
        kv = self.kv.get("general.alignment")
        return int(cast(int, kv.value)) if kv is not None else 32  # a u32 key, decoded to int


_U64 = struct.Struct("<Q")


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path
        self.decoded = 0

    def fail(self, what: str) -> InvalidModel:
        return InvalidModel(f"{self.path.name}: {what}", details={"file": self.path.name})

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def unpack(self, fmt: str, size: int):
        if self.pos + size > len(self.buf):
            raise self.fail("the GGUF header ends early")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def count(self, what: str, cap: int, min_item_bytes: int) -> int:
        """A uint64 count, refused past `cap` or past what the rest of the file could hold."""
        n = self.unpack("<Q", 8)
        if n > cap:
            raise self.fail(f"{what} is {n}, more than the {cap} allowed")
        if n * min_item_bytes > self.left:
            raise self.fail(f"{what} is {n}, more than the rest of the file can hold")
        return n

    def _length(self, what: str, cap: int) -> int:
        n = self.unpack("<Q", 8)
        if n > cap:
            raise self.fail(f"{what} is {n} bytes long, more than the {cap} allowed")
        if n > self.left:
            raise self.fail(f"{what} runs past the end of the file")
        return n

    def string(self, what: str = "a GGUF string", cap: int = MAX_STRING_BYTES) -> str:
        n = self._length(what, cap)
        self.decoded += n
        if self.decoded > MAX_DECODED_BYTES:
            raise self.fail(f"{what}: the header's strings add up to more than {MAX_DECODED_BYTES} bytes")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self, what: str) -> None:
        n = self._length(what, MAX_STRING_BYTES)  # (not `self.pos += ...`: that reads pos first)
        self.pos += n

    def _skip_strings(self, what: str, count: int) -> None:
        """skip_string `count` times, the same checks in one tight loop (a 150k-token vocabulary
        is two such arrays, and this walk was most of a layout read)."""
        buf, pos, end, length = self.buf, self.pos, len(self.buf), _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail("the GGUF header ends early")
            n = length(buf, pos)[0]
            pos += 8
            if n > MAX_STRING_BYTES:
                raise self.fail(f"{what} is {n} bytes long, more than the {MAX_STRING_BYTES} allowed")
            if n > end - pos:
                raise self.fail(f"{what} runs past the end of the file")
            pos += n
        self.pos = pos

    def value(self, vtype: int, key: str, decode: bool = True, depth: int = 0):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], _SIZES[vtype])
        if vtype == _STRING:
            if decode:
                return self.string(f"the string value of {key}")
            self.skip_string(f"a string in {key}")
            return None
        if vtype == _ARRAY:
            return self._array(key, decode, depth)
        raise self.fail(f"{key} has an unknown GGUF value type {vtype}")

    def _array(self, key: str, decode: bool, depth: int):
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{key} nests arrays more than {MAX_ARRAY_NESTING} deep")
        item_type = self.unpack("<I", 4)
        item_size = _SIZES.get(item_type, 8)  # strings and arrays start with an 8-byte length
        count = self.count(f"the item count of {key}", MAX_ARRAY_ITEMS, item_size)
        keep = decode and count <= MAX_DECODED_ARRAY
        if not keep and item_type in _SIZES:
            self.pos += count * item_size  # fixed-size items: one jump (fits: count() checked)
            return None
        if not keep and item_type == _STRING:
            self._skip_strings(f"a string in {key}", count)
            return None
        items = [self.value(item_type, key, keep, depth + 1) for _ in range(count)]
        return items if keep else None


def _read_kv(cur: _Cursor, keep_raw: bool) -> tuple[str, KeyValue]:
    start = cur.pos
    key = cur.string("a key name", MAX_NAME_BYTES)
    vtype = cur.unpack("<I", 4)
    length = None
    if vtype == _ARRAY:  # peek the length without moving
        if cur.left < 12:
            raise cur.fail("the GGUF header ends early")
        length = struct.unpack_from("<Q", cur.buf, cur.pos + 4)[0]
    value = cur.value(vtype, key)
    if cur.pos > MAX_HEADER_BYTES:  # checked before the raw copy below
        raise cur.fail(f"{key}: the GGUF header runs past {MAX_HEADER_BYTES} bytes")
    raw = bytes(cur.buf[start:cur.pos]) if keep_raw else b""
    return key, KeyValue(key, raw, value, length)


def _alignment(cur: _Cursor, kv: dict[str, KeyValue]) -> int:
    if "general.alignment" not in kv:
        return 32
    value = kv["general.alignment"].value
    if (type(value) is not int or value <= 0 or value & (value - 1) or value > MAX_ALIGNMENT):
        raise cur.fail(f"general.alignment must be a power of two up to {MAX_ALIGNMENT}, "
                       f"not {value!r}")
    return value


def _tensor_nbytes(cur: _Cursor, name: str, ne: tuple[int, ...], type_id: int) -> int:
    if type_id not in _BLOCKS:
        raise cur.fail(f"tensor {name} has an unknown ggml type {type_id}")
    block, type_size = _BLOCKS[type_id]
    n = 1
    for d in ne:
        if d > _INT64_MAX:
            raise cur.fail(f"tensor {name} has a dimension of {d}, past 2^63")
        n *= d
    if n > _INT64_MAX:
        raise cur.fail(f"tensor {name} has {n} elements, past 2^63")
    if ne and ne[0] % block:
        raise cur.fail(f"tensor {name}: its row length {ne[0]} is not a multiple of its type's "
                       f"block of {block}")
    return n // block * type_size


def _read_tensor(cur: _Cursor) -> TensorInfo:
    name = cur.string("a tensor name", MAX_NAME_BYTES)
    n_dims = cur.unpack("<I", 4)
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
    ne = tuple(cur.unpack("<Q", 8) for _ in range(n_dims))
    if 0 in ne:  # an empty tensor: every reader divides by its row length
        raise cur.fail(f"tensor {name} has a dimension of 0")
    type_id, offset = cur.unpack("<I", 4), cur.unpack("<Q", 8)
    return TensorInfo(name, ne, type_id, offset, _tensor_nbytes(cur, name, ne, type_id))


def _check_tensors(cur: _Cursor, tensors: list[TensorInfo], data_offset: int,
                   alignment: int) -> None:
    names: set[str] = set()
    for t in tensors:
        if t.name in names:
            raise cur.fail(f"tensor {t.name} appears more than once")
        names.add(t.name)
        if t.offset % alignment:
            raise cur.fail(f"tensor {t.name}: its offset {t.offset} is not a multiple of "
                           f"general.alignment ({alignment})")
        if data_offset + t.offset + t.nbytes > len(cur.buf):
            raise cur.fail(f"tensor {t.name} runs past the end of the file")


def array_values(pair: KeyValue, path: Path, max_items: int = MAX_ARRAY_ITEMS) -> list:
    """Every item of an array key (the vocabulary's tokens, say), decoded from the pair's raw
    bytes (`read_layout(..., keep_raw=True)`): the long arrays the layout skips, read on demand.
    The same caps as the header apply (items, string lengths, decoded bytes)."""
    if not pair.raw:
        raise ValueError(f"{pair.key}: the layout was read without raw bytes")
    cur = _Cursor(pair.raw, Path(path))
    cur.skip_string("a key name")
    if cur.unpack("<I", 4) != _ARRAY:
        raise cur.fail(f"{pair.key} is not an array")
    item_type = cur.unpack("<I", 4)
    count = cur.count(f"the item count of {pair.key}", max_items, _SIZES.get(item_type, 8))
    if item_type == _STRING:  # the common long case (tokens): one tight loop
        return [cur.string(f"a string in {pair.key}") for _ in range(count)]
    return [cur.value(item_type, pair.key, True, 1) for _ in range(count)]


def read_layout(path: Path, *, keep_raw: bool = True) -> Layout:
    """The file's key/values and tensor infos, checked. `keep_raw=False` drops each pair's raw
    bytes (the API only wants the values)."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InvalidModel(f"{path.name} is not a GGUF file (no GGUF magic)",
                               details={"file": path.name})
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            cur.pos = 4
            version = cur.unpack("<I", 4)
            if version not in (2, 3):
                raise cur.fail(f"unsupported GGUF version {version}")
            n_tensors = cur.count("the tensor count", MAX_TENSORS, 8 + 4 + 4 + 8)
            n_kv = cur.count("the key/value count", MAX_KV, 8 + 4 + 1)
            kv: dict[str, KeyValue] = {}
            for _ in range(n_kv):
                key, pair = _read_kv(cur, keep_raw)
                if key in kv:
                    raise cur.fail(f"the key {key} appears more than once")
                kv[key] = pair
            tensors = [_read_tensor(cur) for _ in range(n_tensors)]
            if cur.pos > MAX_HEADER_BYTES:
                raise cur.fail(f"the GGUF header runs past {MAX_HEADER_BYTES} bytes")
            alignment = _alignment(cur, kv)
            data_offset = (cur.pos + alignment - 1) // alignment * alignment
            _check_tensors(cur, tensors, data_offset, alignment)
    return Layout(version, kv, tensors, data_offset)


__all__ = ["read_layout", "array_values", "Layout", "KeyValue", "TensorInfo", "MAX_DECODED_ARRAY", "MAX_KV",
           "MAX_TENSORS", "MAX_ARRAY_ITEMS", "MAX_STRING_BYTES", "MAX_DIMS", "MAX_HEADER_BYTES",
           "MAX_DECODED_BYTES"]
