"""Quality bounds a quantized GGUF must meet against its source model (stdlib + numpy).

Validation compares the artifact's logits (llama.cpp) with the source's (transformers) on a fixed
text: mean KL divergence per token (source || artifact) and top-1 agreement. A failed bound fails
the artifact with ValidationFailed carrying the numbers.

The bounds are calibrated on the worst case we test: tiny random-weight Llamas (hidden 256, 2 and
8 layers, one with 384-wide FFN rows that force fallbacks), which quantize far worse than trained
models (flat, near-tied logits; no outlier structure for an imatrix to find). Measured worst cases
(`max KL`/`min top-1`, with and without imatrix, over a 150-token English text) and the bounds
(KL x2, top-1 x0.6; top-1 not bounded at 2 bits, where it is noise on random weights;
tests/engine/test_quantize.py::test_quality_bounds_hold re-checks them):

    F32 0/1.0  F16 1e-5/0.99  BF16 4e-4/0.92  Q8_0 0.0043/0.92  Q6_K 0.030/0.71
    Q5_K_M 0.071/0.56  Q5_K_S 0.084/0.53  Q5_1 0.090/0.56  Q5_0 0.104/0.44
    Q4_K_M 0.219/0.36  Q4_K_S 0.215/0.34  Q4_1 0.281/0.35  Q4_0 0.313/0.29
    Q3_K_L 0.470/0.14  Q3_K_M 0.489/0.12  Q3_K_S 0.639/0.13  Q2_K 0.960/0.03
    IQ4_NL 0.244/0.31  IQ4_XS 0.250/0.29  IQ3_M 0.466/0.17  IQ3_XXS 0.770/0.10
    IQ2_M 0.849/0.04  IQ2_XS 1.067/0.05  IQ2_XXS 1.141/0.03

A trained model lands far inside them (llama.cpp publishes KL 0.03 for Q4_K_M on Llama-3-8B).
Limits: the random models' logits are nearly flat (KL to a uniform output is ~0.8 nats, to another
random model ~1.6), so at 4 bits and up a broken artifact fails clearly, but at 2-3 bits the
bounds only catch NaN/garbage-level breakage. Callers with a real model (SmolLM2) should pass
tighter Bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import ValidationFailed


@dataclass(frozen=True)
class Bounds:
    max_mean_kl: float  # nats per token
    min_top1: float  # fraction of positions whose argmax agrees


BOUNDS: dict[str, Bounds] = {q: Bounds(kl, top1) for q, (kl, top1) in {
    "F32": (1e-4, 0.99), "F16": (1e-3, 0.90), "BF16": (2e-3, 0.80), "Q8_0": (0.015, 0.70),
    "Q6_K": (0.06, 0.45), "Q5_K_M": (0.15, 0.33), "Q5_K_S": (0.17, 0.32), "Q5_1": (0.18, 0.33),
    "Q5_0": (0.21, 0.26), "Q4_K_M": (0.44, 0.22), "Q4_K_S": (0.44, 0.20), "Q4_1": (0.57, 0.21),
    "Q4_0": (0.63, 0.17), "IQ4_NL": (0.49, 0.19), "IQ4_XS": (0.50, 0.17),
    # at 3 bits and below top-1 on random weights is noise (0 to 0.2 between texts): KL only
    "Q3_K_L": (0.94, 0.04), "Q3_K_M": (0.98, 0.03), "Q3_K_S": (1.28, 0.03), "IQ3_M": (0.94, 0.03),
    "IQ3_S": (1.19, 0.02), "IQ3_XS": (1.27, 0.02), "IQ3_XXS": (1.55, 0.02),
    "Q2_K": (1.92, 0.0), "Q2_K_S": (2.1, 0.0), "IQ2_M": (1.70, 0.0), "IQ2_S": (1.96, 0.0),
    "IQ2_XS": (2.14, 0.0), "IQ2_XXS": (2.29, 0.0), "IQ1_M": (2.6, 0.0), "IQ1_S": (2.7, 0.0),
}.items()}


def non_finite(metrics: Mapping[str, object]) -> list[str]:
    """Names of the float metrics (nested lists included) that are NaN or infinite."""
    def bad(v) -> bool:
        if isinstance(v, (list, tuple)):
            return any(bad(x) for x in v)
        return isinstance(v, (float, np.floating)) and not math.isfinite(float(v))

    return sorted(k for k, v in metrics.items() if bad(v))


def require_finite(metrics: Mapping[str, object], what: str) -> None:
    """ValidationFailed when a validation number is NaN or infinite: every comparison with NaN
    is False, so `kl > bound` would let a NaN artifact through (it did, and was published).
    The details carry the names only (NaN is not JSON)."""
    bad = non_finite(metrics)
    if bad:
        raise ValidationFailed(f"{what}: validation gave non-finite {', '.join(bad)} (NaN or infinity in the "
                               "outputs)", details={"non_finite": bad})


def logit_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Per-token KL(reference || candidate), top-1 agreement and max |logit difference| for two
    (n_tokens, n_vocab) logit arrays over the same tokens (validate.compare_logits)."""
    from .validate import compare_logits

    return compare_logits(reference, candidate)


def check_quality(quantization: str, metrics: dict[str, float], bounds: Bounds | None = None) -> dict[str, float]:
    """Raise ValidationFailed unless `metrics` (from logit_metrics) meet the bounds for
    `quantization`; returns the metrics with the bounds used, for the artifact record."""
    b = bounds or BOUNDS[quantization]
    require_finite(metrics, f"{quantization} artifact")
    kl, top1 = metrics["mean_kl"], metrics["top1_agreement"]
    problems = []
    if not kl <= b.max_mean_kl:  # also catches NaN
        problems.append(f"mean KL divergence {kl:.5f} > {b.max_mean_kl}")
    if not top1 >= b.min_top1:
        problems.append(f"top-1 agreement {top1:.3f} < {b.min_top1}")
    if problems:
        raise ValidationFailed(f"{quantization} artifact drifts from its source: " + "; ".join(problems),
                               details={**metrics, "max_mean_kl_bound": b.max_mean_kl, "min_top1_bound": b.min_top1})
    return {**metrics, "max_mean_kl_bound": b.max_mean_kl, "min_top1_bound": b.min_top1}


__all__ = ["Bounds", "BOUNDS", "logit_metrics", "check_quality", "non_finite", "require_finite"]
