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
        if ref.dtype == "BF16":  # bfloat16 is the top half of a float32: widen exactly
            wide = raw.astype(np.uint32)
            wide <<= 16  # in place: one float32-sized array at the peak, not two
            return wide.view(np.float32)
        return np.array(raw, dtype=np.float32)
    finally:
        del raw


__all__ = ["read_f32"]
