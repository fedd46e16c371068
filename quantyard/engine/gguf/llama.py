"""The Llama architecture: HF config -> llama.* metadata, HF tensor names -> GGUF names, and the
Q/K row permutation llama.cpp's RoPE expects (facts from llama.cpp's conversion/llama.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import gguf
import numpy as np

from ..errors import InvalidModel

ARCH = gguf.MODEL_ARCH.LLAMA
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]  # "llama"
ARCHITECTURES = ("LlamaForCausalLM",)
# HF tensors that carry nothing llama.cpp needs (recomputed at load time).
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def _need(config: dict, key: str):
    if key not in config:
        raise InvalidModel(f"config.json lacks {key!r}, which a Llama model needs")
    return config[key]


def rope_parameters(config: dict) -> dict:
    """transformers >= 5 writes `rope_parameters`; older configs use rope_theta + rope_scaling."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def head_dim(config: dict) -> int:
    return config.get("head_dim") or _need(config, "hidden_size") // _need(config, "num_attention_heads")


def write_hparams(w: gguf.GGUFWriter, config: dict) -> None:
    """The llama.* keys llama.cpp reads for this architecture."""
    n_head = _need(config, "num_attention_heads")
    w.add_block_count(_need(config, "num_hidden_layers"))
    w.add_context_length(config.get("max_position_embeddings", 2048))
    w.add_embedding_length(_need(config, "hidden_size"))
    w.add_feed_forward_length(_need(config, "intermediate_size"))
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(_need(config, "vocab_size"))
    w.add_rope_dimension_count(head_dim(config))
    if config.get("head_dim") is not None:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    _write_rope(w, rope_parameters(config))


def _write_rope(w: gguf.GGUFWriter, rope: dict) -> None:
    w.add_rope_freq_base(float(rope["rope_theta"]))
    kind, factor = rope.get("rope_type", "default"), rope.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor
        raise InvalidModel(f"unsupported rope scaling type {kind!r} (supported: default, linear, yarn, llama3)")


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Per-frequency divisors for llama3-style RoPE scaling (llama.cpp's rope_freqs tensor)."""
    rope = rope_parameters(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base, dim = rope["rope_theta"], head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, dim, 2):
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


class TensorNamer:
    """Maps HF tensor names to GGUF names and says which need the Q/K permutation."""

    def __init__(self, config: dict) -> None:
        self.n_blocks = _need(config, "num_hidden_layers")
        self.n_head = _need(config, "num_attention_heads")
        self.n_head_kv = config.get("num_key_value_heads") or self.n_head
        self._map = gguf.get_tensor_name_map(ARCH, self.n_blocks)

    def gguf_name(self, hf_name: str) -> str | None:
        """None for tensors llama.cpp does not use; InvalidModel for ones we can't place."""
        if hf_name.endswith(_SKIPPED_SUFFIXES):
            return None
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InvalidModel(f"tensor {hf_name!r} has no GGUF counterpart for architecture {ARCH_NAME}")
        return name

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return permute_qk(data, self.n_head)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return permute_qk(data, self.n_head_kv)
        return data


def tensor_order_key(gguf_name: str) -> tuple:
    """Stable, source-layout-independent order: embeddings, blocks in order, then the head."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), ".".join(parts[2:]))
    return (0 if gguf_name.startswith(("token_embd", "rope_freqs")) else 2, 0, gguf_name)


def extra_tensors(config: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that HF does not store."""
    factors = llama3_rope_factors(config)
    if factors is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


__all__ = [
    "ARCH_NAME", "ARCHITECTURES", "write_hparams", "TensorNamer", "permute_qk",
    "tensor_order_key", "extra_tensors", "rope_parameters", "llama3_rope_factors",
]
