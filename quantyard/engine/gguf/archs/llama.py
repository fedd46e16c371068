"""Llama and Mistral (GGUF arch "llama"): the Q/K row permutation llama.cpp's RoPE expects and
Llama-3-style rope scaling as a rope_freqs tensor (facts from llama.cpp's conversion/llama.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import gguf
import numpy as np

from .base import LLAMA_BLOCK, Architecture, HParams, full_attention_rope


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Per-frequency divisors for llama3-style RoPE scaling (llama.cpp's rope_freqs tensor)."""
    rope = full_attention_rope(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base, dim = rope.get("rope_theta", 10000.0), head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, dim, 2):
        # llama.cpp computes the frequencies in float32 torch; the thresholds are coarse enough
        # that float64 here lands on the same side of every comparison
        wavelen = 2 * math.pi * base ** (i / dim)  # 2*pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores Q/K rows with RoPE's two halves split; llama.cpp wants them interleaved per head.
    For K, n_head is the number of KV heads."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Llama(Architecture):
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    vocab_style = "llama"
    required_block_tensors = LLAMA_BLOCK

    def __init__(self, config: dict, tokenizer_vocab_size: int | None = None) -> None:
        super().__init__(config, tokenizer_vocab_size)
        self.n_head = self.need("num_attention_heads")
        self.n_head_kv = self.config.get("num_key_value_heads") or self.n_head

    def hparams(self) -> HParams:
        hp = super().hparams()
        hp.set("add_vocab_size", self.need("vocab_size"))
        hp.set("add_rope_dimension_count", head_dim(self.config))
        return hp

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        # looked up through the module so a test can swap the permutation out
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return _module().permute_qk(data, self.n_head)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return _module().permute_qk(data, self.n_head_kv)
        return data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        factors = llama3_rope_factors(self.config)
        if factors is not None:
            yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


def _module():
    import sys

    return sys.modules[__name__]


__all__ = ["Llama", "permute_qk", "llama3_rope_factors", "head_dim"]
