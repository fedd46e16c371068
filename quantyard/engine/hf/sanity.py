"""config.json sizes checked before anything is allocated from them.

A conversion sizes per-layer tables, vocabularies and reference models from config.json, so an
otherwise valid config saying `num_hidden_layers: 1000000` or `vocab_size: 1e12` used to drive
a worker to many GB before failing. Here, from config.json and the safetensors headers only:

* every size field is an integer in a sane range (`check_config_sizes`, run on every load);
* the sizes agree with the tensors actually present: as many layers as the weights number,
  the embedding's rows = vocab_size and its width = hidden_size (`check_against_tensors`);
* the peak memory the converters estimate (preflight's `peak_memory_bytes`) is held to the
  worker's limit (`require_memory`).

Failures are InvalidModel naming config.json and the field (or ResourceLimit for memory).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..errors import InvalidModel, ResourceLimit

# (aliases across families, largest accepted). The caps are far above any real model (126
# layers, a 262k vocabulary, hidden 16-25k) and far below what would hurt to allocate.
SIZE_FIELDS: dict[str, tuple[tuple[str, ...], int]] = {
    "num_hidden_layers": (("num_hidden_layers", "n_layer", "num_layers", "n_layers"), 4096),
    "vocab_size": (("vocab_size",), 1 << 22),
    "hidden_size": (("hidden_size", "n_embd", "d_model", "dim"), 1 << 17),
    "intermediate_size": (("intermediate_size", "n_inner", "ffn_dim", "hidden_dim"), 1 << 20),
    "num_attention_heads": (("num_attention_heads", "n_head", "n_heads"), 1 << 12),
    "num_key_value_heads": (("num_key_value_heads",), 1 << 12),
    "head_dim": (("head_dim",), 1 << 14),
    "max_position_embeddings": (("max_position_embeddings", "n_positions", "n_ctx"), 1 << 24),
}
_LAYER = re.compile(r"^(?P<prefix>.*?(?:^|\.)(?:layers|layer|h|blocks|block))\.(?P<i>\d+)\.")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
               "tok_embeddings.weight", "embed_in.weight")
# Memory beyond the weights: interpreter, torch, llama.cpp, tokenizers.
BASE_MEMORY_BYTES = 768 * 1024 * 1024


def _fail(field: str, what: str) -> InvalidModel:
    return InvalidModel(f"config.json: {field} {what}", details={"file": "config.json", "field": field})


def _scopes(config: Mapping) -> list[tuple[str, Mapping]]:
    """The config and its nested text config (multimodal families keep the LM's sizes there)."""
    scopes = [("", config)]
    text = config.get("text_config")
    if isinstance(text, Mapping):
        scopes.append(("text_config.", text))
    return scopes


def check_config_sizes(config: Mapping) -> None:
    """Every size field present is a positive integer under its cap (null is allowed: e.g.
    GPT-2's n_inner)."""
    for prefix, scope in _scopes(config):
        for aliases, cap in SIZE_FIELDS.values():
            for key in aliases:
                value = scope.get(key)
                if value is None:
                    continue
                field = prefix + key
                if type(value) is not int:
                    raise _fail(field, f"must be an integer, not {str(value)[:40]!r}")
                if not 0 < value <= cap:
                    raise _fail(field, f"is {value}; it must be between 1 and {cap}")


def size(config: Mapping, name: str) -> int | None:
    """A size field by its canonical name, through its aliases (text_config first)."""
    aliases, _ = SIZE_FIELDS[name]
    for _, scope in reversed(_scopes(config)):
        for key in aliases:
            if type(scope.get(key)) is int:
                return scope[key]
    return None


def layer_counts(names: Iterable[str]) -> dict[str, int]:
    """{block prefix ("model.layers"): number of distinct layer indices} over tensor names."""
    found: dict[str, set[int]] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            found.setdefault(m["prefix"], set()).add(int(m["i"]))
    return {prefix: max(ids) + 1 if len(ids) == max(ids) + 1 else -len(ids)
            for prefix, ids in found.items()}


def check_against_tensors(config: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The sizes config.json claims agree with the tensors present (name -> shape)."""
    layers = size(config, "num_hidden_layers")
    counts = layer_counts(shapes)
    if layers is not None and counts and layers not in counts.values():
        prefix, n = max(counts.items(), key=lambda kv: abs(kv[1]))
        held = f"{n} layers ({prefix}.0-{n - 1})" if n > 0 else f"{-n} layers with gaps ({prefix})"
        raise _fail("num_hidden_layers", f"is {layers} but the weights hold {held}")
    embedding = next((shapes[n] for n in shapes if n.endswith(_EMBEDDINGS) and len(shapes[n]) == 2),
                     None)
    if embedding is None:
        return
    vocab, hidden = size(config, "vocab_size"), size(config, "hidden_size")
    if vocab is not None and embedding[0] != vocab:
        raise _fail("vocab_size", f"is {vocab} but the token embedding has {embedding[0]} rows")
    if hidden is not None and "embedding_size" not in config and embedding[1] != hidden:
        raise _fail("hidden_size", f"is {hidden} but the token embedding is {embedding[1]} wide")


def require_memory(estimates: Mapping[str, Mapping[str, int]], limit: int | None) -> None:
    """ResourceLimit when a target's estimated peak (plus the runtimes) is over `limit`."""
    peak = max((int(e.get("peak_memory_bytes", 0)) for e in estimates.values()), default=0)
    needed = peak + BASE_MEMORY_BYTES
    if limit and needed > limit:
        raise ResourceLimit(
            f"converting this model needs about {needed / 2**30:.1f} GiB of memory; a conversion "
            f"may use {limit / 2**30:.1f} GiB here", details={"needed_bytes": needed, "limit_bytes": limit})


__all__ = ["SIZE_FIELDS", "check_config_sizes", "check_against_tensors", "layer_counts", "size",
           "require_memory"]
