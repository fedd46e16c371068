"""A GGUF file (or a llama.cpp split set) as the input of a requantization.

The files' headers are read by gguf_layout and their data memory-mapped: nothing is read until a tensor's bytes are
asked for, so a model of any size costs address space, not memory. Metadata is kept as the raw
bytes of each key-value pair, so copying it into the output preserves every type exactly
(uint32 vs int32, arrays of strings, ...), as llama.cpp's gguf_set_kv does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidModel
from . import ggml_quants
from .ggml_types import GGML_TYPES_BY_ID
from .gguf_layout import read_layout

SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_MAX_SHARDS = 99999
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class InputTensor:
    name: str
    ne: tuple[int, ...]  # ggml order (ne[0] = row length)
    type_id: int
    raw: np.ndarray  # uint8 view of the tensor's bytes in the mapped file

    @property
    def type_name(self) -> str:
        t = GGML_TYPES_BY_ID.get(self.type_id)
        return t.name if t else ggml_quants.type_name(self.type_id).upper()

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= int(d)
        return n

    def rows_f32(self, first: int, count: int) -> np.ndarray:
        """Rows [first, first+count) (rows of ne[0] values, across all higher dims) as float32,
        converted with ggml's own routines (what llama-quantize does with a non-F32 input)."""
        n = int(self.ne[0])
        row_bytes = ggml_quants.row_size(self.type_id, n)
        raw = self.raw[first * row_bytes:(first + count) * row_bytes]
        return ggml_quants.dequantize(raw, self.type_id, count * n).reshape(count, n)


_MADV_DONTNEED = 4
_PAGE = 4096


def release_pages(view: np.ndarray) -> None:
    """Drop the mapped file pages under `view` from this process's memory once a tensor is done.

    Reading a tensor through the mapping pulls its pages in and the kernel counts them in our
    RSS until the mapping goes; without this, streaming a whole model leaves the whole model
    resident. The pages are clean file pages, so dropping them loses nothing (a later read
    faults them back in from the file)."""
    import ctypes
    import mmap

    if view.size == 0:
        return
    page = getattr(mmap, "PAGESIZE", _PAGE)
    start = view.ctypes.data
    first = (start + page - 1) // page * page  # only whole pages inside the view
    end = (start + view.nbytes) // page * page
    if end > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first),
                                  _MADV_DONTNEED)


def _tensor_nbytes(type_id: int, ne: tuple[int, ...]) -> int:
    rows = 1
    for d in ne[1:]:
        rows *= int(d)
    return ggml_quants.row_size(type_id, int(ne[0])) * rows


class GGUFInput:
    """The KV metadata and tensors of one model stored as a GGUF file or a split set."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        first = read_layout(self.path)
        self._layouts = [(self.path, first)]
        self._fields = first.kv
        for shard in self._other_shards():
            self._layouts.append((shard, read_layout(shard)))
        self._maps: list[np.memmap] = []
        self.tensors = self._collect_tensors()

    def _other_shards(self) -> list[Path]:
        """llama.cpp's naming: <prefix>-00001-of-0000N.gguf, the first shard holds the KV."""
        count = self.value("split.count", 1)
        if type(count) is not int or not 0 <= count <= _MAX_SHARDS:  # the name has 5 digits
            raise InvalidModel(f"{self.path.name}: split.count must be a number of shards up to "
                               f"{_MAX_SHARDS}, not {count!r}"[:300], details={"file": self.path.name})
        if count <= 1:
            return []
        m = _SPLIT_NAME.match(self.path.name)
        if not m or int(m.group("no")) != 1:
            raise InvalidModel(f"{self.path.name} is one shard of {count}: give the first, "
                               "named <name>-00001-of-000NN.gguf")
        shards = [self.path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(2, count + 1)]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise InvalidModel(f"split GGUF is missing shards: {', '.join(missing)}")
        return shards

    def _collect_tensors(self) -> dict[str, InputTensor]:
        tensors: dict[str, InputTensor] = {}
        for path, layout in self._layouts:
            data = np.memmap(path, dtype=np.uint8, mode="r")
            self._maps.append(data)
            for t in layout.tensors:
                start = layout.data_offset + t.offset
                nbytes = _tensor_nbytes(t.type_id, t.ne)
                if start + nbytes > data.size:
                    raise InvalidModel(f"{path.name}: tensor {t.name} runs past the end of the file")
                if t.name in tensors:
                    raise InvalidModel(f"{path.name}: tensor {t.name} is in more than one shard")
                tensors[t.name] = InputTensor(t.name, t.ne, t.type_id, data[start:start + nbytes])
        expected = self.value("split.tensors.count")
        if expected is not None and expected != len(tensors):
            raise InvalidModel(f"split GGUF declares {expected} tensors but its shards hold {len(tensors)}")
        return tensors

    # -- metadata ---------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._fields)

    def value(self, key: str, default=None):
        kv = self._fields.get(key)
        return default if kv is None else kv.value

    def raw_kv(self, key: str) -> bytes:
        """The key-value pair exactly as stored (key, type, value), ready to be copied."""
        return self._fields[key].raw

    @property
    def alignment(self) -> int:
        return int(self.value("general.alignment", 32))

    @property
    def architecture(self) -> str:
        return str(self.value("general.architecture", ""))

    def small_fields(self) -> dict[str, object]:
        """Every scalar value and short array (hparams), skipping the big tokenizer arrays."""
        return {key: kv.value for key, kv in self._fields.items() if kv.value is not None}

    def close(self) -> None:
        for data in self._maps:
            base = getattr(data, "_mmap", None)
            if base is not None:
                try:
                    base.close()
                except (BufferError, ValueError):  # views still alive; the GC will unmap it
                    pass
        self._maps = []

    def __enter__(self) -> "GGUFInput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["GGUFInput", "InputTensor", "SPLIT_KEYS"]
