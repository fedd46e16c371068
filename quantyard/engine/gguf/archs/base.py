"""What every architecture shares: HF config -> GGUF hparams, HF tensor names -> GGUF names,
per-tensor transforms, generated tensors. Facts follow llama.cpp's convert_hf_to_gguf.py
(conversion/base.py `TextModel`); the code is ours.

An architecture is described by a subclass of `Architecture` bound to one config.json. It never
reads tensor data itself: `output_shape` answers from shapes alone (preflight and the GGUF
header need it before any tensor is loaded), `transform` is applied to each tensor as it streams.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, ClassVar

import gguf
import numpy as np

from ...errors import InvalidModel

# HF tensors llama.cpp never uses, with the reason (convert_hf_to_gguf skips them too). Every
# other source tensor must land on a GGUF tensor or the conversion is refused naming it.
SKIPPED = {
    ".attention.masked_bias": "causal-mask buffer; llama.cpp builds its own mask",
    ".attention.bias": "causal-mask buffer; llama.cpp builds its own mask",
    ".attn.bias": "GPT-2 causal-mask buffer; llama.cpp builds its own mask",
    ".attn.masked_bias": "GPT-2 causal-mask buffer; llama.cpp builds its own mask",
    ".rotary_emb.inv_freq": "RoPE frequencies; llama.cpp recomputes them from rope_theta",
}
SKIPPED_SUFFIXES = tuple(SKIPPED)


@functools.lru_cache(maxsize=16)
def _tensor_name_map(arch: gguf.MODEL_ARCH, block_count: int) -> gguf.TensorNameMap:
    """gguf-py's name map for (arch, blocks), built once (~0.4 s each: a conversion asks for the
    architecture several times); only looked up in, never changed."""
    return gguf.get_tensor_name_map(arch, block_count)


class HParams(dict):
    """GGUFWriter method name -> positional args, in write order; a later set() of the same
    method replaces the earlier value (convert_hf_to_gguf overrides base keys this way, e.g.
    Gemma 3's defaults; GGUFWriter itself would warn about a duplicated key)."""

    def set(self, method: str, *args: Any) -> None:
        self.pop(method, None)
        self[method] = args

    def write(self, w: gguf.GGUFWriter) -> None:
        for method, args in self.items():
            getattr(w, method)(*args)


def merged_config(config: dict) -> dict:
    """convert_hf_to_gguf lifts a nested text_config to the top level (multimodal wrappers)."""
    if isinstance(config.get("text_config"), dict):
        return {**config, **config["text_config"]}
    return dict(config)


def find(config: dict, keys: tuple[str, ...], optional: bool = False) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    if optional:
        return None
    raise InvalidModel(f"config.json lacks all of {', '.join(keys)}")


def rope_parameters(config: dict) -> dict:
    """RoPE settings as convert_hf_to_gguf sees them: `rope_parameters` (transformers >= 5) or
    `rope_scaling`, with top-level theta / partial factor / original context mirrored in when the
    config has no per-attention-type split (full_attention / sliding_attention)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in params or "sliding_attention" in params:
        return params
    theta = find(config, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                          "rotary_emb_base"), optional=True)
    local_theta = find(config, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                                "rope_local_base_freq"), optional=True)
    partial = find(config, ("partial_rotary_factor", "rope_pct", "rope_percent"), optional=True)
    orig_ctx = config.get("original_max_position_embeddings")
    if local_theta is not None:
        params["sliding_attention"] = {"rope_theta": local_theta}
    if "rope_theta" not in params and theta is not None:
        params["rope_theta"] = theta
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    if "partial_rotary_factor" not in params and partial is not None:
        params["partial_rotary_factor"] = partial
    if "original_max_position_embeddings" not in params and orig_ctx is not None:
        params["original_max_position_embeddings"] = orig_ctx
    return params


def full_attention_rope(config: dict) -> dict:
    rope = rope_parameters(config)
    return rope.get("full_attention", rope)


class Architecture:
    """One HF architecture family; subclasses set the class attributes and override hooks."""

    hf_architectures: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    # which tokenizer conversion convert_hf_to_gguf uses for this family (see vocab.py)
    vocab_style: ClassVar[str] = "llama"
    # HF tensor names dropped before mapping, with the reason (e.g. Gemma's redundant tied lm_head)
    dropped_tensors: ClassVar[dict[str, str]] = {}
    # GGUF tensors llama.cpp's loader needs: in every block (name after "blk.N."), and once
    required_block_tensors: ClassVar[tuple[str, ...]] = ()
    required_tensors: ClassVar[tuple[str, ...]] = ("token_embd.weight", "output_norm.weight")
    # the output head: needed unless tied to the embedding (llama.cpp then reuses token_embd);
    # None = never stored (the family always ties it). `ties_by_default`: transformers' default
    # for this config class when config.json has no tie_word_embeddings.
    output_tensor: ClassVar[str | None] = "output.weight"
    ties_by_default: ClassVar[bool] = False

    def __init__(self, config: dict, tokenizer_vocab_size: int | None = None) -> None:
        self.config = merged_config(config)
        self.block_count = find(self.config, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
        self._map = _tensor_name_map(self.gguf_arch, self.block_count)
        self.tokenizer_vocab_size = tokenizer_vocab_size

    # ---- metadata ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def need(self, key: str) -> Any:
        if self.config.get(key) is None:
            raise InvalidModel(f"config.json lacks {key!r}, which a {self.name} model needs")
        return self.config[key]

    def hparams(self) -> HParams:
        """convert_hf_to_gguf's TextModel.set_gguf_parameters (file type is written elsewhere)."""
        c, hp = self.config, HParams()
        hp.set("add_block_count", self.block_count)
        if (n_ctx := find(c, ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                              "max_sequence_length", "model_max_length"), optional=True)) is not None:
            hp.set("add_context_length", n_ctx)
        if (n_embd := find(c, ("hidden_size", "n_embd", "dim"), optional=True)) is not None:
            hp.set("add_embedding_length", n_embd)
        if (n_ff := find(c, ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                             "n_inner", "hidden_dim"), optional=True)) is not None:
            hp.set("add_feed_forward_length", n_ff)
        if (n_head := find(c, ("num_attention_heads", "n_head", "n_heads"), optional=True)) is not None:
            hp.set("add_head_count", n_head)
        if (n_head_kv := find(c, ("num_key_value_heads", "n_kv_heads"), optional=True)) is not None:
            hp.set("add_head_count_kv", n_head_kv)
        if c.get("is_causal") is False:
            hp.set("add_causal_attention", False)
        self._rope_scaling(hp)
        rope = rope_parameters(c)
        if (theta := rope.get("full_attention", rope).get("rope_theta")) is not None:
            hp.set("add_rope_freq_base", float(theta))
        if (local_theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
            hp.set("add_rope_freq_base_swa", float(local_theta))
        if (eps := find(c, ("rms_norm_eps", "norm_eps"), optional=True)) is not None:
            hp.set("add_layer_norm_rms_eps", float(eps))
        if (eps := find(c, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"), optional=True)) is not None:
            hp.set("add_layer_norm_eps", float(eps))
        if (head_dim := c.get("head_dim")) is not None:
            hp.set("add_key_length", head_dim)
            hp.set("add_value_length", head_dim)
        return hp

    def _rope_scaling(self, hp: HParams) -> None:
        rope = full_attention_rope(self.config)
        kind, factor = rope.get("rope_type"), rope.get("factor")
        if kind is None or kind == "default":
            return
        if kind == "linear" and factor is not None:
            hp.set("add_rope_scaling_type", gguf.RopeScalingType.LINEAR)
            hp.set("add_rope_scaling_factor", float(factor))
        elif kind == "yarn" and factor is not None:
            hp.set("add_rope_scaling_type", gguf.RopeScalingType.YARN)
            hp.set("add_rope_scaling_factor", float(factor))
            hp.set("add_rope_scaling_orig_ctx_len", rope["original_max_position_embeddings"])
            for key, method in (("extrapolation_factor", "add_rope_scaling_yarn_ext_factor"),
                                ("beta_fast", "add_rope_scaling_yarn_beta_fast"),
                                ("beta_slow", "add_rope_scaling_yarn_beta_slow")):
                if rope.get(key) is not None:
                    hp.set(method, float(rope[key]))
            if (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                hp.set("add_rope_scaling_yarn_attn_factor", float(attn))
        elif kind in ("su", "longrope"):
            hp.set("add_rope_scaling_type", gguf.RopeScalingType.LONGROPE)
        elif str(kind).lower() == "llama3":
            pass  # carried by the rope_freqs tensor (extra_tensors)
        else:
            raise InvalidModel(f"unsupported rope scaling type {kind!r} for {self.name} "
                               "(supported: default, linear, yarn, llama3, longrope)")

    # ---- tensors ----------------------------------------------------------------------------

    def skip_reason(self, hf_name: str) -> str | None:
        """Why an HF tensor is not written (None: it must be)."""
        if hf_name in self.dropped_tensors:
            return self.dropped_tensors[hf_name]
        return next((why for suffix, why in SKIPPED.items() if hf_name.endswith(suffix)), None)

    def keep(self, hf_name: str) -> bool:
        """False for HF tensors llama.cpp does not use."""
        return self.skip_reason(hf_name) is None

    def ties_output(self) -> bool:
        tied = self.config.get("tie_word_embeddings")
        return self.ties_by_default if tied is None else bool(tied)

    def required(self) -> list[str]:
        """Every GGUF tensor llama.cpp needs for this config (generated ones excluded)."""
        names = list(self.required_tensors)
        names += [f"blk.{i}.{t}" for i in range(int(self.block_count)) for t in self.required_block_tensors]
        if self.output_tensor is not None and not self.ties_output():
            names.append(self.output_tensor)
        return names

    def check_complete(self, written: set[str], file: str) -> None:
        """InvalidModel naming the tensors llama.cpp needs that the source (`file`, the weight
        files' names) does not provide."""
        missing = [n for n in self.required() if n not in written]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise InvalidModel(f"{file}: no source tensor for what a {self.name} model with this config.json "
                               f"needs (GGUF names): {', '.join(missing[:5])}{more}",
                               details={"file": file, "reason": "missing_tensors", "tensors": missing[:5],
                                        "count": len(missing)})

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of an HF tensor; None when it is dropped; InvalidModel when unplaceable."""
        if not self.keep(hf_name):
            return None
        name = hf_name.replace("language_model.", "")
        new = self._map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InvalidModel(f"tensor {hf_name!r} has no GGUF counterpart for architecture {self.name}")
        return new

    def output_shape(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape (numpy order) of the tensor after `transform`, from its source shape alone."""
        return tuple(shape)

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        return data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Tensors llama.cpp needs that HF does not store (rope factors, ...)."""
        return iter(())


def tensor_order_key(gguf_name: str) -> tuple:
    """Stable, source-layout-independent order: embeddings and generated tensors, blocks in
    order, then the head."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), ".".join(parts[2:]))
    head = gguf_name.startswith(("output", "output_norm"))
    return (2 if head else 0, 0, gguf_name)


# the blocks of a Llama-style decoder, as llama.cpp's loader requires them
LLAMA_BLOCK = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
               "ffn_norm.weight", "ffn_gate.weight", "ffn_down.weight", "ffn_up.weight")


__all__ = ["Architecture", "HParams", "rope_parameters", "full_attention_rope", "merged_config", "find",
           "tensor_order_key", "SKIPPED", "SKIPPED_SUFFIXES", "LLAMA_BLOCK"]
