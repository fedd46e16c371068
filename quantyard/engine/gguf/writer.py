"""Stream tensors into a GGUF file one at a time.

gguf-py's GGUFWriter can take every tensor's info (name, shape, type, byte size) up front, write
header + metadata + tensor infos, and then accept the tensor data in the same order one tensor
at a time. So only the tensor being encoded is ever in memory, whatever the model's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from . import ggml_quants
from .ggml_types import GGML_TYPES


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


def encode(data: np.ndarray, type_name: str) -> np.ndarray:
    """float32 -> the bytes of `type_name` (F32 is passed through; the rest is ggml's own code)."""
    if type_name == "F32":
        return np.ascontiguousarray(data, dtype=np.float32)
    return ggml_quants.quantize(data, GGML_TYPES[type_name].id)


def write_gguf(
    path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
    plans: Sequence[TensorPlan], on_tensor: Callable[[int, TensorPlan], None] | None = None,
) -> None:
    """Write `plans` to `path`; `on_tensor(i, plan)` runs after each tensor (it may raise)."""
    writer = gguf.GGUFWriter(path, arch)
    try:
        add_metadata(writer)
        for plan in plans:
            writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(GGML_TYPES[plan.type_name].id))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, plan in enumerate(plans):
            data = plan.load()
            if tuple(data.shape) != plan.shape:
                raise ValueError(f"{plan.name}: loader gave shape {data.shape}, planned {plan.shape}")
            writer.write_tensor_data(encode(data, plan.type_name))
            del data
            if on_tensor is not None:
                on_tensor(i, plan)
    finally:
        writer.close()


__all__ = ["TensorPlan", "encode", "write_gguf"]
