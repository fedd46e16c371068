"""GPT-2 (GGUF arch "gpt2"; llama.cpp's conversion/gpt2.py).

HF GPT-2 uses Conv1D layers that store weights as (in, out): c_attn, c_proj and c_fc weights are
transposed to llama.cpp's (out, in). The output head is tied to wte and not stored; llama.cpp
reuses token_embd when no output tensor is present. The feed-forward length is 4 * n_embd
(convert_hf_to_gguf ignores n_inner).
"""

from __future__ import annotations

import gguf
import numpy as np

from ...errors import InvalidModel
from .base import Architecture, HParams

_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2(Architecture):
    hf_architectures = ("GPT2LMHeadModel",)
    gguf_arch = gguf.MODEL_ARCH.GPT2
    vocab_style = "gpt2"
    # llama.cpp's gpt2 loader needs every bias and the learned positions
    required_block_tensors = tuple(f"{t}.{kind}" for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm",
                                                             "ffn_up", "ffn_down") for kind in ("weight", "bias"))
    required_tensors = ("token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias")
    ties_by_default = True

    def hparams(self) -> HParams:
        c, hp = self.config, HParams()
        if c.get("n_inner") not in (None, 4 * self.need("n_embd")):
            raise InvalidModel("llama.cpp's gpt2 architecture needs n_inner = 4 * n_embd "
                               f"(config.json has n_inner={c['n_inner']})")
        hp.set("add_block_count", self.block_count)
        hp.set("add_context_length", self.need("n_ctx") if c.get("n_ctx") is not None else self.need("n_positions"))
        hp.set("add_embedding_length", self.need("n_embd"))
        hp.set("add_feed_forward_length", 4 * self.need("n_embd"))
        hp.set("add_head_count", self.need("n_head"))
        hp.set("add_layer_norm_eps", float(self.need("layer_norm_epsilon")))
        return hp

    def output_shape(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(shape)) if hf_name.endswith(_CONV1D) else tuple(shape)

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        if hf_name.endswith(_CONV1D):
            return np.ascontiguousarray(data.T)
        return data


__all__ = ["GPT2"]
