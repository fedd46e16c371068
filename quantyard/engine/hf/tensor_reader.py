"""Read one safetensors tensor as float32, via mmap (only that tensor's pages are touched)."""

from __future__ import annotations

import numpy as np

from .safetensors_header import TensorRef

# safetensors is little-endian by definition
_NUMPY_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def read_f32(ref: TensorRef) -> np.ndarray:
    """The tensor as a fresh float32 array (the mapping is dropped before returning)."""
    if ref.dtype not in _NUMPY_DTYPES:
        raise ValueError(f"cannot read {ref.dtype} tensor {ref.name}")
    if ref.nbytes == 0:
        return np.zeros(ref.shape, dtype=np.float32)
    raw = np.memmap(ref.file, dtype=_NUMPY_DTYPES[ref.dtype], mode="r", offset=ref.offset, shape=ref.shape)
    try:
        return _widened(raw, ref.dtype)
    finally:
        del raw


def read_f32_rows(ref: TensorRef, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the tensor (its first axis) as a fresh float32 array: only their
    pages are read."""
    if ref.dtype not in _NUMPY_DTYPES:
        raise ValueError(f"cannot read {ref.dtype} tensor {ref.name}")
    if not 0 <= start <= stop <= ref.shape[0]:
        raise ValueError(f"rows {start}:{stop} of {ref.name}, which has {ref.shape[0]}")
    if ref.nbytes == 0:
        return np.zeros((stop - start, *ref.shape[1:]), dtype=np.float32)
    raw = np.memmap(ref.file, dtype=_NUMPY_DTYPES[ref.dtype], mode="r", offset=ref.offset, shape=ref.shape)
    try:
        return _widened(raw[start:stop], ref.dtype)
    finally:
        del raw


def _widened(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":  # bfloat16 is the top half of a float32: widen exactly
        wide = raw.astype(np.uint32)
        wide <<= 16  # in place: one float32-sized array at the peak, not two
        return wide.view(np.float32)
    return np.array(raw, dtype=np.float32)


__all__ = ["read_f32", "read_f32_rows"]
