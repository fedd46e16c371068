"""A decoder (text-generation) target's params, checked into one frozen options object.

Pure Python, so preflight refuses bad params and impossible targets before anything heavy is
imported. Decoders have their own tolerances (logits are unnormalised scores over a vocabulary,
and greedy generation is checked token by token), kept here rather than in options.py, which
holds the encoders'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedTarget
from ..spec import TargetSpec
from .manifest import QUANTIZATIONS
from .options import BLOCK_SIZES, OPSETS, WEIGHT_TYPES, _bool, _choice

DECODER_QUANTIZATIONS = ("fp32", "fp16", "int8-dynamic", "int4")

# Why int8-static is refused for decoders (rather than calibrated on prompts): its activation
# ranges would be fitted on prefill steps only, while a generated token runs one position at a
# time against a growing cache; int8-dynamic gives the same weight size with per-call
# activation scales, and that is what onnxruntime's own LLM tooling ships.
INT8_STATIC_REFUSAL = (
    "onnx:int8-static is not offered for text-generation decoders: static activation ranges "
    "calibrated on whole prompts do not cover the one-token decode steps that reuse the key/value "
    "cache, so generation quality is not guaranteed; use onnx:int8-dynamic (same weight size, "
    "activation scales computed per call) or onnx:int4"
)

# Defaults per quantization, applied when a job gives no `tolerances`.
#   max_abs_diff: logits of the prefill step over every real (unpadded) prompt position
#   min_cosine:   worst prompt's cosine of mean-centred last-position logits rows
#   min_token_agreement: mean over prompts of the greedy tokens that equal transformers' before
#                        the first difference, as a fraction of the tokens asked for
# fp32 must reproduce transformers' greedy tokens exactly (1.0). Quantized defaults are set on
# SmolLM2-135M with a margin (measured: fp32 diff 1.1e-4; int8-dynamic diff 1.3, cosine 0.9988,
# agreement 0.55; int4 diff 16.8, cosine 0.885, agreement 0.08: 4-bit rounding of a 135M model
# keeps the first token and drifts after a few) and on the tiny test models (fp16 diff 0.03,
# cosine 0.99998, agreement 1.0). A broken graph (zero or permuted logits) fails every one.
DECODER_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_diff": 1e-3, "min_cosine": 0.99999, "min_token_agreement": 1.0},
    "fp16": {"max_abs_diff": 0.5, "min_cosine": 0.999, "min_token_agreement": 0.5},
    "int8-dynamic": {"max_abs_diff": 4.0, "min_cosine": 0.99, "min_token_agreement": 0.3},
    "int4": {"max_abs_diff": 25.0, "min_cosine": 0.85, "min_token_agreement": 0.05},
}

NEW_TOKENS_RANGE = (1, 256)
# int8-dynamic for decoders: "matmul_nbits" = 8-bit block-quantized weights (MatMulNBits) run with
# accuracy_level 4, i.e. activations quantized to int8 per block at run time; "quantize_dynamic" =
# onnxruntime's classic dynamic quantization (MatMulInteger, one activation scale per tensor).
# Measured on SmolLM2-135M against transformers: matmul_nbits centred logits cosine 0.9988,
# greedy agreement 0.55, 2.2x faster per token than fp32; quantize_dynamic 0.90 and 0.03 (raw
# cosine vs fp32 0.32-0.51 whatever was left in float: lm_head, embeddings, per-tensor
# weights): per-tensor activation scales can't hold an LLM's outlier channels.
INT8_METHODS = ("matmul_nbits", "quantize_dynamic")


@dataclass(frozen=True)
class DecoderOptions:
    quantization: str
    opset: int = 18
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "QInt8"
    block_size: int = 32
    int8_method: str = "matmul_nbits"
    # int4: asymmetric blocks (a zero point per block) measured better on SmolLM2 (centred
    # cosine 0.885 and top-1 3/3, vs 0.779 and 1/3 symmetric)
    symmetric: bool = False
    # int8-dynamic / int4: quantize the output projection (lm_head) too (a tied head gets its
    # own quantized copy). Leaving it in float did not rescue quantize_dynamic on SmolLM2
    # (cosine 0.37 vs 0.32) and costs 4 bytes a parameter of a 49k x 576 matrix.
    quantize_lm_head: bool = True
    # int4 (GatherBlockQuantized) and quantize_dynamic (int8 Gather): quantize the token
    # embedding table, the largest tensor of a small LLM; matmul_nbits int8 keeps it in float
    # (onnxruntime has no 8-bit block-quantized Gather).
    quantize_embeddings: bool = True
    new_tokens: int = 20
    # tensors in `<file>.data` beside the graph even below 2 GB (always above it)
    external_data: bool = False
    max_abs_diff: float = 1e-3
    min_cosine: float = 0.99999
    min_token_agreement: float = 1.0

    @property
    def tolerances(self) -> dict[str, float]:
        return {"max_abs_diff": self.max_abs_diff, "min_cosine": self.min_cosine,
                "min_token_agreement": self.min_token_agreement}


def _new_tokens(params: Mapping[str, Any]) -> int:
    value = params.get("new_tokens", 20)
    low, high = NEW_TOKENS_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UnsupportedTarget(f"onnx param new_tokens must be an integer from {low} to {high}, not {value!r}")
    return value


def _tolerances(quantization: str, params: Mapping[str, Any]) -> dict[str, float]:
    tol = dict(DECODER_TOLERANCES[quantization])
    given = params.get("tolerances") or {}
    if not isinstance(given, Mapping) or set(given) - set(tol):
        raise UnsupportedTarget(f"onnx param tolerances takes only {', '.join(tol)} for a text-generation model")
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UnsupportedTarget(f"tolerance {key} must be a number, not {value!r}")
        tol[key] = float(value)
    return tol


def parse_decoder_options(target: TargetSpec) -> DecoderOptions:
    if target.format != "onnx":
        raise UnsupportedTarget(f"the ONNX engine makes format 'onnx', not {target.format!r}")
    if target.quantization == "int8-static":
        raise UnsupportedTarget(INT8_STATIC_REFUSAL, details={"quantization": "int8-static",
                                                              "offered": list(DECODER_QUANTIZATIONS)})
    if target.quantization not in DECODER_QUANTIZATIONS or target.quantization not in QUANTIZATIONS:
        raise UnsupportedTarget(f"onnx has no quantization {target.quantization!r} for text-generation models; "
                                f"valid: {', '.join(DECODER_QUANTIZATIONS)}")
    p = target.params
    return DecoderOptions(
        quantization=target.quantization,
        opset=_choice(p, "opset", OPSETS, 18),
        per_channel=_bool(p, "per_channel", True),
        reduce_range=_bool(p, "reduce_range", False),
        weight_type=_choice(p, "weight_type", WEIGHT_TYPES, "QInt8"),
        block_size=_choice(p, "block_size", BLOCK_SIZES, 32),
        int8_method=_choice(p, "int8_method", INT8_METHODS, "matmul_nbits"),
        symmetric=_bool(p, "symmetric", False),
        quantize_lm_head=_bool(p, "quantize_lm_head", True),
        quantize_embeddings=_bool(p, "quantize_embeddings", True),
        new_tokens=_new_tokens(p),
        external_data=_bool(p, "external_data", False),
        **_tolerances(target.quantization, p),
    )


__all__ = [
    "DECODER_QUANTIZATIONS",
    "DECODER_TOLERANCES",
    "INT8_STATIC_REFUSAL",
    "DecoderOptions",
    "parse_decoder_options",
]
