"""Gemma 2 and Gemma 3 text (GGUF archs "gemma2", "gemma3"; llama.cpp's conversion/gemma.py).

- RMSNorm weights are stored as offsets from 1 (HF computes x * (1 + w)): every "*norm.weight"
  gets +1 so llama.cpp's plain RMSNorm computes the same thing.
- The output head is the embedding (llama.cpp scales the embedding by sqrt(n_embd) itself);
  Gemma 2's lm_head copy is dropped, Gemma 3's embedding is cut to the tokenizer's real size.
- Gemma 2: attention and final logit soft-capping and the sliding window go into the metadata;
  llama.cpp alternates sliding/global layers (pattern 2) as transformers does.
- Gemma 3: global rope theta (full_attention) and local one (sliding_attention, rope_freq_base_swa),
  final soft-capping when set, sliding window (llama.cpp's pattern: 5 local then 1 global).
- llama.cpp scales queries by 1/sqrt(head_dim) (except 27B sizes), i.e. it assumes
  query_pre_attn_scalar == head_dim; validation catches a model where that does not hold.
"""

from __future__ import annotations

from typing import ClassVar

import gguf
import numpy as np

from .base import LLAMA_BLOCK, Architecture, HParams, full_attention_rope

_GEMMA_BLOCK = LLAMA_BLOCK + ("post_attention_norm.weight", "post_ffw_norm.weight")


class Gemma2(Architecture):
    hf_architectures = ("Gemma2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    vocab_style = "gemma"
    dropped_tensors: ClassVar[dict[str, str]] = {
        "lm_head.weight": "Gemma 2 ties the head to the embedding; llama.cpp reuses token_embd"}
    required_block_tensors = _GEMMA_BLOCK
    output_tensor = None

    def hparams(self) -> HParams:
        # Gemma2Model.set_gguf_parameters does not start from the shared keys
        c, hp = self.config, HParams()
        hp.set("add_context_length", self.need("max_position_embeddings"))
        hp.set("add_embedding_length", self.need("hidden_size"))
        hp.set("add_block_count", self.block_count)
        hp.set("add_feed_forward_length", self.need("intermediate_size"))
        hp.set("add_head_count", self.need("num_attention_heads"))
        hp.set("add_head_count_kv", c.get("num_key_value_heads") or c["num_attention_heads"])
        hp.set("add_layer_norm_rms_eps", float(self.need("rms_norm_eps")))
        hp.set("add_key_length", self.need("head_dim"))
        hp.set("add_value_length", self.need("head_dim"))
        hp.set("add_attn_logit_softcapping", float(self.need("attn_logit_softcapping")))
        hp.set("add_final_logit_softcapping", float(self.need("final_logit_softcapping")))
        hp.set("add_sliding_window", self.need("sliding_window"))
        return hp

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        if hf_name.endswith("norm.weight"):
            return data + np.float32(1.0)
        return data


class Gemma3(Architecture):
    hf_architectures = ("Gemma3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    vocab_style = "gemma3"  # tokenizer.model when present (Gemma style), else byte-level BPE
    required_block_tensors = _GEMMA_BLOCK + ("attn_q_norm.weight", "attn_k_norm.weight")
    ties_by_default = True

    def hparams(self) -> HParams:
        hp = super().hparams()
        c = self.config
        hp.set("add_context_length", c.get("max_position_embeddings", 131072))
        hp.set("add_head_count", c.get("num_attention_heads", 8))
        hp.set("add_layer_norm_rms_eps", float(c.get("rms_norm_eps", 1e-6)))
        hp.set("add_key_length", c.get("head_dim", 256))
        hp.set("add_value_length", c.get("head_dim", 256))
        hp.set("add_rope_freq_base", float(full_attention_rope(c).get("rope_theta", 1_000_000.0)))
        if c.get("attn_logit_softcapping") is not None:
            from ...errors import InvalidModel

            raise InvalidModel("Gemma 3 has no attention logit soft-capping, but config.json sets one")
        if c.get("final_logit_softcapping"):
            hp.set("add_final_logit_softcapping", float(c["final_logit_softcapping"]))
        if c.get("sliding_window_pattern") != 1:
            hp.set("add_sliding_window", self.need("sliding_window"))
        hp.set("add_head_count_kv", c.get("num_key_value_heads", 4))
        return hp

    def _is_embedding(self, hf_name: str) -> bool:
        return "embed_tokens.weight" in hf_name

    def output_shape(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self._is_embedding(hf_name) and self.tokenizer_vocab_size is not None:
            return (min(shape[0], self.tokenizer_vocab_size), *shape[1:])
        return tuple(shape)

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        if self._is_embedding(hf_name) and self.tokenizer_vocab_size is not None:
            data = data[: self.tokenizer_vocab_size]  # drop out-of-vocabulary rows
        if hf_name.endswith("norm.weight"):
            data = data + np.float32(1.0)
        return data


__all__ = ["Gemma2", "Gemma3"]
