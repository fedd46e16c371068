"""Compatibility alias: the Llama family now lives in quantyard.engine.gguf.archs.llama."""

from __future__ import annotations

from .archs.base import rope_parameters, tensor_order_key
from .archs.llama import Llama, head_dim, llama3_rope_factors, permute_qk

ARCH_NAME = "llama"
ARCHITECTURES = Llama.hf_architectures

__all__ = ["ARCH_NAME", "ARCHITECTURES", "Llama", "permute_qk", "llama3_rope_factors", "head_dim",
           "rope_parameters", "tensor_order_key"]
