"""A fast reader of a GGUF file's layout: key/values (raw bytes and decoded values) and tensor
infos. Tensor data is not touched.

gguf-py's GGUFReader builds a numpy view for every element of every array, which takes seconds
on a real vocabulary (150,000 tokens and merges) and dominated requantization time; here long
arrays are skipped over with plain `struct` reads and only short values are decoded.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidModel

# GGUF value types: uint8, int8, uint16, int16, uint32, int32, float32, bool, string, array,
# uint64, int64, float64.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_SIZES = {t: struct.calcsize(f) for t, f in _SCALARS.items()}
_STRING, _ARRAY = 8, 9
# Arrays up to this length are decoded (hparams, per-layer lists); longer ones (vocab) are not.
MAX_DECODED_ARRAY = 1024


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


@dataclass(frozen=True)
class Layout:
    version: int
    kv: dict[str, KeyValue]
    tensors: list[TensorInfo]
    data_offset: int  # where the data section starts in the file

    @property
    def alignment(self) -> int:
        kv = self.kv.get("general.alignment")
        return int(kv.value) if kv is not None else 32


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str, size: int):
        if self.pos + size > len(self.buf):
            raise InvalidModel(f"{self.path.name}: the GGUF header ends early")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q", 8)
        if self.pos + n > len(self.buf):
            raise InvalidModel(f"{self.path.name}: a GGUF string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.unpack("<Q", 8)  # (not `self.pos += ...`: that reads pos before unpack moves it)
        self.pos += n

    def value(self, vtype: int, decode: bool = True):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], _SIZES[vtype])
        if vtype == _STRING:
            if decode:
                return self.string()
            self.skip_string()
            return None
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I", 4), self.unpack("<Q", 8)
            keep = decode and count <= MAX_DECODED_ARRAY
            if not keep and item_type in _SIZES:
                self.pos += count * _SIZES[item_type]  # fixed-size items: one jump
                return None
            items = [self.value(item_type, keep) for _ in range(count)]
            return items if keep else None
        raise InvalidModel(f"{self.path.name}: unknown GGUF value type {vtype}")


def read_layout(path: Path) -> Layout:
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, path)
        if bytes(buf[:4]) != b"GGUF":
            raise InvalidModel(f"{path.name} is not a GGUF file (no GGUF magic)")
        cur.pos = 4
        version = cur.unpack("<I", 4)
        if version not in (2, 3):
            raise InvalidModel(f"{path.name}: unsupported GGUF version {version}")
        n_tensors, n_kv = cur.unpack("<Q", 8), cur.unpack("<Q", 8)
        kv: dict[str, KeyValue] = {}
        for _ in range(n_kv):
            start = cur.pos
            key = cur.string()
            vtype = cur.unpack("<I", 4)
            length = None
            if vtype == _ARRAY:  # peek the length without moving
                length = struct.unpack_from("<Q", buf, cur.pos + 4)[0]
            value = cur.value(vtype)
            kv[key] = KeyValue(key, bytes(buf[start:cur.pos]), value, length)
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I", 4)
            ne = tuple(cur.unpack("<Q", 8) for _ in range(n_dims))
            type_id, offset = cur.unpack("<I", 4), cur.unpack("<Q", 8)
            tensors.append(TensorInfo(name, ne, type_id, offset))
        alignment = int(kv["general.alignment"].value) if "general.alignment" in kv else 32
        data_offset = (cur.pos + alignment - 1) // alignment * alignment
    return Layout(version, kv, tensors, data_offset)


__all__ = ["read_layout", "Layout", "KeyValue", "TensorInfo", "MAX_DECODED_ARRAY"]
