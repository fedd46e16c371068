"""Preflight of a text-generation decoder: params parsed (int8-static refused) and each target's
size, memory and disk estimated from safetensors headers, before anything heavy is imported."""

from __future__ import annotations

from collections.abc import Sequence

from ..dominant import dominant_type
from ..results import PreflightReport
from ..spec import TargetSpec
from .decoder_options import DecoderOptions, parse_decoder_options
from .source import EncoderSource

EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe")


def _split(tensors) -> dict[str, int]:
    """Parameters by role: token/position embeddings, lm_head, other matrices, the rest."""
    parts = {"embeddings": 0, "lm_head": 0, "linear": 0, "other": 0}
    for name, t in tensors.items():
        if any(e in name for e in EMBEDDING_NAMES):
            parts["embeddings"] += t.n_elements
        elif name.startswith("lm_head"):
            parts["lm_head"] += t.n_elements
        elif len(t.shape) == 2:
            parts["linear"] += t.n_elements
        else:
            parts["other"] += t.n_elements
    return parts


def estimate_decoder(tensors, config: dict, opts: DecoderOptions) -> dict[str, int]:
    parts = _split(tensors)
    if not parts["lm_head"]:  # tied: the exported graph keeps its own (transposed) copy
        parts["lm_head"] = int(config.get("vocab_size", 0)) * int(config.get("hidden_size") or config.get("n_embd") or 0)
    q = opts.quantization
    # block formats carry a float scale (and for asymmetric int4 a 4-bit zero point) per block
    linear = {"fp32": 4.0, "fp16": 2.0, "int4": 0.5 + 4.5 / opts.block_size,
              "int8-dynamic": 1.0 + (4 / opts.block_size if opts.int8_method == "matmul_nbits" else 0)}[q]
    float_bytes = 2.0 if q == "fp16" else 4.0
    head = linear if opts.quantize_lm_head or q in ("fp32", "fp16") else float_bytes
    quantized_table = opts.quantize_embeddings and (q == "int4" or opts.int8_method == "quantize_dynamic")
    emb = linear if q in ("int8-dynamic", "int4") and quantized_table else float_bytes
    size = int(parts["linear"] * linear + parts["lm_head"] * head + parts["embeddings"] * emb
               + parts["other"] * float_bytes) + 1_000_000
    fp32 = sum(parts.values()) * 4
    # torch model + the exporter's program + the graph re-read to fold external data, at the peak
    return {"size_bytes": size, "peak_memory_bytes": 3 * fp32 + size, "disk_bytes": 2 * fp32 + size}


def preflight_decoder(src: EncoderSource, targets: Sequence[TargetSpec]) -> PreflightReport:
    opts = [parse_decoder_options(t) for t in targets]  # UnsupportedTarget (int8-static, bad params)
    if src.weights == "safetensors":
        from ..hf.source import checked_tensors

        tensors = checked_tensors(src.root, src.config)
        count = sum(t.n_elements for t in tensors.values())
        dtype = dominant_type((t.dtype, t.n_elements) for t in tensors.values())
        estimates = {t.key: estimate_decoder(tensors, src.config, o) for t, o in zip(targets, opts, strict=False)}
    else:
        # a pickle has no header to read: its size is all we know without loading it
        count, dtype = (src.root / src.weights).stat().st_size // 4, "unknown"
        estimates = {t.key: {"size_bytes": count * 4} for t in targets}
    return PreflightReport(architecture=src.architecture, parameter_count=count, source_dtype=dtype,
                           estimates=estimates)


__all__ = ["estimate_decoder", "preflight_decoder"]
