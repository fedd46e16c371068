"""A target's params, checked and turned into one frozen options object (pure Python).

Every bad param is an UnsupportedTarget naming the valid values, raised before any heavy work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedTarget
from ..spec import TargetSpec
from .manifest import QUANTIZATIONS
from .samples import DEFAULT_CALIBRATION_TEXTS

OPSETS = (17, 18, 19, 20, 21)
WEIGHT_TYPES = ("QInt8", "QUInt8")
BLOCK_SIZES = (32, 64, 128)
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")
# int8-dynamic activation scales: "row" (one per token row, outlier channels in float:
# rowquant.py) or "tensor" (onnxruntime's quantize_dynamic, after smoothing: smooth.py)
ACTIVATION_SCALES = ("row", "tensor")

# Defaults per quantization. max_abs_diff: over real (unpadded) tokens of the output;
# min_cosine: the worst sentence's cosine (mean-pooled embeddings, or logits rows).
# Set from measurements on all-MiniLM-L6-v2 with a margin (fp32 diff ~5e-6, fp16 ~4e-3,
# int8-dynamic cosine ~0.998 (row scales), int8-static ~0.989, int4 ~0.97): loose enough for a sound
# artifact of a real model, tight enough that a broken export (diffs of whole units) fails.
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_diff": 1e-4, "min_cosine": 0.99999},
    "fp16": {"max_abs_diff": 5e-2, "min_cosine": 0.9999},
    "int8-dynamic": {"max_abs_diff": 1.5, "min_cosine": 0.99},
    "int8-static": {"max_abs_diff": 1.5, "min_cosine": 0.98},
    "int4": {"max_abs_diff": 2.0, "min_cosine": 0.95},
}


@dataclass(frozen=True)
class OnnxOptions:
    quantization: str
    opset: int = 17
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "QInt8"
    block_size: int = 32
    calibration_method: str = "MinMax"
    calibration_texts: tuple[str, ...] = DEFAULT_CALIBRATION_TEXTS
    # int8-static: leave the FFN down-projections (input = GELU output, heavy outliers) in
    # float; quantizing them took MiniLM's embedding cosine from 0.989 to 0.92.
    static_skip_ffn_down: bool = True
    # int8-dynamic: per-row activation scales (rowquant.py) by default for text encoders;
    # None = "row" when there is a tokenizer to calibrate with, "tensor" otherwise (programs)
    activation_scales: str | None = None
    # int8-dynamic: shrink outlier activation channels into the weights first (smooth.py);
    # None = on for "tensor" scales, off for "row" (there it measured worse: 0.9972 vs 0.9982)
    smooth_activations: bool | None = None
    # tensors in `<file>.data` beside the graph even below protobuf's 2 GB limit (always above
    # it): runtimes that memory-map weights, or stores that cap object sizes, want this
    external_data: bool = False
    max_abs_diff: float = 1e-4
    min_cosine: float = 0.99999


def _choice(params: Mapping[str, Any], key: str, valid: tuple, default: Any) -> Any:
    value = params.get(key, default)
    if value not in valid:
        raise UnsupportedTarget(f"onnx param {key}={value!r} is not offered; valid: {', '.join(map(str, valid))}")
    return value


def _bool(params: Mapping[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise UnsupportedTarget(f"onnx param {key} must be true or false, not {value!r}")
    return value


def _optional_bool(params: Mapping[str, Any], key: str) -> bool | None:
    return None if params.get(key) is None else _bool(params, key, False)


def _texts(params: Mapping[str, Any]) -> tuple[str, ...]:
    texts = params.get("calibration_texts")
    if texts is None:
        return DEFAULT_CALIBRATION_TEXTS
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise UnsupportedTarget("onnx param calibration_texts must be a non-empty list of non-empty strings")
    return tuple(texts)


def _tolerances(quantization: str, params: Mapping[str, Any]) -> dict[str, float]:
    tol = dict(DEFAULT_TOLERANCES[quantization])
    given = params.get("tolerances") or {}
    if not isinstance(given, Mapping) or set(given) - set(tol):
        raise UnsupportedTarget(f"onnx param tolerances takes only {', '.join(tol)}")
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UnsupportedTarget(f"tolerance {key} must be a number, not {value!r}")
        tol[key] = float(value)
    return tol


def _calibration(params: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """`calibration` may be a method name or {"method": ..., "texts": [...]}."""
    cal = params.get("calibration") or {}
    if isinstance(cal, str):
        cal = {"method": cal}
    if not isinstance(cal, Mapping):
        raise UnsupportedTarget("onnx param calibration must be a method name or an object")
    method = _choice(cal, "method", CALIBRATION_METHODS, "MinMax")
    texts = _texts({"calibration_texts": cal.get("texts", params.get("calibration_texts"))})
    return method, texts


def parse_options(target: TargetSpec) -> OnnxOptions:
    if target.format != "onnx":
        raise UnsupportedTarget(f"the ONNX engine makes format 'onnx', not {target.format!r}")
    if target.quantization not in QUANTIZATIONS:
        raise UnsupportedTarget(f"onnx has no quantization {target.quantization!r}; valid: {', '.join(QUANTIZATIONS)}")
    p = target.params
    method, texts = _calibration(p)
    return OnnxOptions(
        quantization=target.quantization,
        opset=_choice(p, "opset", OPSETS, 17),
        per_channel=_bool(p, "per_channel", True),
        reduce_range=_bool(p, "reduce_range", False),
        # int8-dynamic: uint8 weights measured closer on MiniLM (see quantize.to_int8_dynamic);
        # int8-static keeps int8 weights (QDQ with uint8 activations)
        weight_type=_choice(p, "weight_type", WEIGHT_TYPES,
                            "QUInt8" if target.quantization == "int8-dynamic" else "QInt8"),
        block_size=_choice(p, "block_size", BLOCK_SIZES, 32),
        calibration_method=method,
        calibration_texts=texts,
        static_skip_ffn_down=_bool(p, "static_skip_ffn_down", True),
        activation_scales=None if p.get("activation_scales") is None
        else _choice(p, "activation_scales", ACTIVATION_SCALES, None),
        smooth_activations=_optional_bool(p, "smooth_activations"),
        external_data=_bool(p, "external_data", False),
        **_tolerances(target.quantization, p),
    )


__all__ = ["ACTIVATION_SCALES", "BLOCK_SIZES", "DEFAULT_TOLERANCES", "OPSETS", "OnnxOptions", "parse_options"]
