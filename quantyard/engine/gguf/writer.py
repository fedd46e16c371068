"""Stream tensors into GGUF files one at a time, several files from one read of each tensor.

gguf-py's GGUFWriter can take every tensor's info (name, shape, type, byte size) up front, write
header + metadata + tensor infos, and then accept the tensor data in the same order one tensor
at a time. So only the tensors being encoded are ever in memory, whatever the model's size.

`write_ggufs` feeds several such writers from one pass: each tensor is loaded (read, widened,
transformed) once, encoded once per distinct ggml type, and appended to every file. Loading and
encoding the next tensor runs in a helper thread while the current one is written (numpy's
conversions, ggml's encoders through ctypes and file writes all release the GIL), so the two
cores overlap read/convert with write; the bytes and their order do not depend on it.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from . import ggml_quants
from .ggml_types import GGML_TYPES

# encoding F16/BF16 rows of a tensor this big is split across threads (ggml's fp32->fp16 is a
# plain loop; each chunk's bytes are independent of the split)
_PARALLEL_ENCODE_VALUES = 1 << 20
# metadata arrays at least this long (token lists, merges, scores, types) take the fast packing
_FAST_ARRAY = 256
_VT = gguf.GGUFValueType


def _pack_array(val: Sequence, sub_type) -> bytes | None:
    """GGUFWriter._pack_val's bytes for a little-endian array of strings or numbers (item type
    and count, then the items), in one join / one struct call instead of one call per item;
    None when the items are not of one such type (GGUFWriter then packs it, or says why not)."""
    ltype = sub_type if sub_type is not None else _VT.get_type(val[0])
    if sub_type is None and not all(_VT.get_type(v) is ltype for v in val):
        return None
    head = struct.pack("<IQ", ltype, len(val))
    if ltype == _VT.STRING:
        encoded = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
        return head + b"".join([struct.pack("<Q", len(e)) + e for e in encoded])
    fmt = gguf.GGUFWriter._simple_value_packing.get(ltype)
    if fmt is None or ltype == _VT.BOOL:
        return None
    return head + struct.pack(f"<{len(val)}{fmt}", *val)


class _PackingWriter(gguf.GGUFWriter):
    """GGUFWriter with long arrays packed in one call each, and an immutable (tuple) array packed
    once for every file of a write_ggufs pass: a recorded vocabulary hands each file the same
    tuples. Same bytes as GGUFWriter (tests/engine/test_metadata_parity.py compares every key
    with convert_hf_to_gguf.py's; test_float_multi compares whole files)."""

    def __init__(self, path: Path, arch: str, memo: dict[int, tuple[tuple, bytes]]) -> None:
        super().__init__(path, arch)
        self._memo = memo

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if (vtype != _VT.ARRAY or not isinstance(val, (list, tuple)) or len(val) < _FAST_ARRAY
                or self.endianess != gguf.GGUFEndian.LITTLE):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        hit = self._memo.get(id(val)) if isinstance(val, tuple) and sub_type is None else None
        if hit is not None and hit[0] is val:
            body = hit[1]
        else:
            packed = _pack_array(val, sub_type)
            if packed is None:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            body = packed
            if isinstance(val, tuple) and sub_type is None:
                self._memo[id(val)] = (val, body)
        return (struct.pack("<I", _VT.ARRAY) if add_vtype else b"") + body


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it comes from and what it becomes."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows last), as the loader returns it
    type_name: str  # ggml type, e.g. "Q8_0"
    load: Callable[[], np.ndarray]  # float32 data, already transformed for llama.cpp
    source_name: str | None = None  # HF name, None for generated tensors

    @property
    def nbytes(self) -> int:
        return GGML_TYPES[self.type_name].nbytes(math.prod(self.shape))


@dataclass(frozen=True)
class GGUFOutput:
    """One file of a `write_ggufs` pass: its path, its metadata and its tensor plan."""

    path: Path
    add_metadata: Callable[[gguf.GGUFWriter], None]
    plans: Sequence[TensorPlan]


def encode(data: np.ndarray, type_name: str, nthread: int = 1) -> np.ndarray:
    """float32 -> the bytes of `type_name` (F32 is passed through; the rest is ggml's own code)."""
    if type_name == "F32":
        return np.ascontiguousarray(data, dtype=np.float32)
    threads = nthread if data.size >= _PARALLEL_ENCODE_VALUES else 1
    return ggml_quants.quantize(data, GGML_TYPES[type_name].id, nthread=threads)


def _check_aligned(outputs: Sequence[GGUFOutput]) -> None:
    """Every output lists the same tensors (names and shapes) in the same order."""
    first = [(p.name, p.shape) for p in outputs[0].plans]
    for out in outputs[1:]:
        if [(p.name, p.shape) for p in out.plans] != first:
            raise ValueError(f"{out.path.name}: its tensor plan differs from {outputs[0].path.name}'s")


def _load_encoded(plans: Sequence[TensorPlan], nthread: int) -> dict[str, np.ndarray]:
    """Tensor i of every output: loaded once, encoded once per distinct type."""
    data = plans[0].load()
    if tuple(data.shape) != plans[0].shape:
        raise ValueError(f"{plans[0].name}: loader gave shape {data.shape}, planned {plans[0].shape}")
    encoded: dict[str, np.ndarray] = {}
    for p in plans:
        if p.type_name not in encoded:
            encoded[p.type_name] = encode(data, p.type_name, nthread)
    return encoded


def write_ggufs(arch: str, outputs: Sequence[GGUFOutput],
                on_tensor: Callable[[int, TensorPlan], None] | None = None, *, nthread: int | None = None) -> None:
    """Write every output in one pass over the tensors; `on_tensor(i, plan)` (plan of the first
    output) runs after tensor i went to every file, and may raise (Cancelled): files are then left
    incomplete for the caller to remove. At most two tensors are in flight: the one being written
    and the next one being loaded and encoded; a big tensor is encoded on `nthread` threads
    (default: every CPU)."""
    if not outputs:
        return
    nthread = nthread or os.cpu_count() or 1
    _check_aligned(outputs)
    memo: dict[int, tuple[tuple, bytes]] = {}
    writers = [_PackingWriter(out.path, arch, memo) for out in outputs]
    try:
        for w, out in zip(writers, outputs, strict=True):
            out.add_metadata(w)
            for plan in out.plans:
                w.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes,
                                  raw_dtype=gguf.GGMLQuantizationType(GGML_TYPES[plan.type_name].id))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        _stream(writers, outputs, on_tensor, nthread)
    finally:
        for w in writers:
            w.close()


def _stream(writers: Sequence[gguf.GGUFWriter], outputs: Sequence[GGUFOutput],
            on_tensor: Callable[[int, TensorPlan], None] | None, nthread: int) -> None:
    columns = list(zip(*(out.plans for out in outputs), strict=True))
    with ThreadPoolExecutor(1, thread_name_prefix="gguf-load") as pool:
        pending: Future | None = pool.submit(_load_encoded, columns[0], nthread) if columns else None
        try:
            for i, plans in enumerate(columns):
                assert pending is not None
                encoded = pending.result()
                pending = pool.submit(_load_encoded, columns[i + 1], nthread) if i + 1 < len(columns) else None
                for w, p in zip(writers, plans, strict=True):
                    w.write_tensor_data(encoded[p.type_name])
                del encoded
                if on_tensor is not None:
                    on_tensor(i, plans[0])
        finally:
            if pending is not None:
                pending.cancel()


def write_gguf(
    path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
    plans: Sequence[TensorPlan], on_tensor: Callable[[int, TensorPlan], None] | None = None,
) -> None:
    """Write `plans` to `path`; `on_tensor(i, plan)` runs after each tensor (it may raise)."""
    write_ggufs(arch, [GGUFOutput(Path(path), add_metadata, plans)], on_tensor)


__all__ = ["TensorPlan", "GGUFOutput", "encode", "write_gguf", "write_ggufs"]
