"""Qwen2 and Qwen3 (GGUF archs "qwen2", "qwen3"; llama.cpp's conversion/qwen.py).

No Q/K permutation (NEOX-style RoPE). Qwen2 keeps its q/k/v biases; Qwen3 drops them and adds
per-head RMS norms on Q and K (attn_q_norm / attn_k_norm), mapped by name like any other tensor.
Small models tie the output head to the embeddings: llama.cpp then reuses token_embd.
"""

from __future__ import annotations

from typing import ClassVar

import gguf

from .base import LLAMA_BLOCK, Architecture


class Qwen2(Architecture):
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    vocab_style = "qwen2"  # tokenizer.model when present, else byte-level BPE
    # llama.cpp's qwen2 loader needs the q/k/v biases
    required_block_tensors: ClassVar[tuple[str, ...]] = LLAMA_BLOCK + ("attn_q.bias", "attn_k.bias", "attn_v.bias")


class Qwen3(Qwen2):
    hf_architectures = ("Qwen3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    required_block_tensors = LLAMA_BLOCK + ("attn_q_norm.weight", "attn_k_norm.weight")


__all__ = ["Qwen2", "Qwen3"]
