"""Phi-3 (GGUF arch "phi3"; llama.cpp's conversion/phi.py Phi3MiniModel).

HF already stores the fused projections llama.cpp wants: `qkv_proj` -> attn_qkv (Q, K, V rows
stacked) and `gate_up_proj` -> ffn_up (gate rows then up rows; llama.cpp splits it in half for
SwiGLU). No Q/K permutation (NEOX RoPE). Long-context variants (LongRoPE / "su") get
rope_factors_long/short tensors and an attention factor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import gguf
import numpy as np

from ...errors import InvalidModel
from .base import Architecture, HParams, find, full_attention_rope, rope_parameters


class Phi3(Architecture):
    hf_architectures = ("Phi3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.PHI3
    vocab_style = "phi3"
    required_block_tensors = ("attn_norm.weight", "attn_qkv.weight", "attn_output.weight", "ffn_norm.weight",
                              "ffn_up.weight", "ffn_down.weight")

    def _rope_dims(self) -> int:
        n_embd = find(self.config, ("hidden_size", "n_embd"))
        n_head = find(self.config, ("num_attention_heads", "n_head"))
        return int(rope_parameters(self.config).get("partial_rotary_factor", 1.0) * n_embd) // n_head

    def _orig_ctx(self) -> int:
        rope = rope_parameters(self.config)
        if rope.get("original_max_position_embeddings") is None:
            raise InvalidModel("config.json lacks original_max_position_embeddings, which a phi3 model needs")
        return rope["original_max_position_embeddings"]

    def hparams(self) -> HParams:
        c, hp = self.config, HParams()
        hp.set("add_context_length", find(c, ("n_positions", "max_position_embeddings")))
        hp.set("add_rope_scaling_orig_ctx_len", self._orig_ctx())
        hp.set("add_embedding_length", find(c, ("hidden_size", "n_embd")))
        hp.set("add_feed_forward_length", find(c, ("intermediate_size",)))
        hp.set("add_block_count", self.block_count)
        hp.set("add_head_count", find(c, ("num_attention_heads", "n_head")))
        hp.set("add_head_count_kv", find(c, ("num_key_value_heads", "n_head_kv")))
        hp.set("add_layer_norm_rms_eps", float(find(c, ("rms_norm_eps",))))
        hp.set("add_rope_dimension_count", self._rope_dims())
        hp.set("add_rope_freq_base", float(full_attention_rope(c)["rope_theta"]))
        # 0 tells llama.cpp "no sliding window" (and Phi-4 apart from Phi-3)
        hp.set("add_sliding_window", c.get("sliding_window") or 0)
        if self._long_factors() is not None:
            hp.set("add_rope_scaling_attn_factors", self._attn_factor())
        return hp

    def _long_factors(self):
        return rope_parameters(self.config).get("long_factor") or None

    def _attn_factor(self) -> float:
        rope = rope_parameters(self.config)
        scale = find(self.config, ("n_positions", "max_position_embeddings")) / self._orig_ctx()
        kind = str(rope.get("rope_type", rope.get("type", ""))).lower()
        if kind in ("su", "longrope"):
            return math.sqrt(1 + math.log(scale) / math.log(self._orig_ctx())) if scale > 1.0 else 1.0
        if kind == "yarn":
            return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        raise InvalidModel(f"unsupported Phi-3 rope scaling type {kind!r} (supported: longrope, su, yarn)")

    def _rope_scaling(self, hp: HParams) -> None:  # Phi-3 writes its own keys above
        return None

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        rope = rope_parameters(self.config)
        long, short = rope.get("long_factor"), rope.get("short_factor")
        if not long:
            return
        if short is None or len(long) != len(short) or len(long) != self._rope_dims() / 2:
            raise InvalidModel(f"Phi-3 rope long/short factors must both have {self._rope_dims() // 2} values")
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(long, np.float32)
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(short, np.float32)


__all__ = ["Phi3"]
