"""Which ggml type each tensor gets for a target (stdlib only).

Mirrors llama.cpp so our files match what its tools produce:
- convert_hf_to_gguf: 1-D tensors and norms stay F32 whatever --outtype says.
- src/llama-quant.cpp (tensor_allows_quantization): only 2-D+ tensors whose name ends in
  "weight" and that are not norms, MoE routers or position/token-type embeddings are
  quantized; a row that does not split into whole blocks falls back (to F16 for 32-blocks).
"""

from __future__ import annotations

from .ggml_types import FILE_TYPES, GGML_TYPES

_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight", "token_types.weight")


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization for the tensors a Llama model has."""
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    return not any(marker in name for marker in _NEVER_QUANTIZED)


def _fit_row(type_name: str, row: int) -> str:
    """A type whose blocks tile a row of `row` values (llama.cpp's fallback for odd shapes)."""
    if row % GGML_TYPES[type_name].block_size == 0:
        return type_name
    return "F16"


def tensor_type(name: str, shape: tuple[int, ...], quantization: str) -> str:
    """ggml type name for GGUF tensor `name` of numpy `shape` (rows last) under `quantization`."""
    base = FILE_TYPES[quantization].base_type
    if base == "F32" or not allows_quantization(name, shape):
        return "F32"
    return _fit_row(base, shape[-1])


__all__ = ["allows_quantization", "tensor_type"]
