"""The `gguf:auto` target's parameters, checked when the job is submitted (stdlib only).

{"format": "gguf", "quantization": "auto", "params": {"max_size": "100M", "objective": "accurate"}}

- budget: `max_size` (a size like 500M, spec.parse_size), `max_mean_kl` (> 0) and/or
  `max_ppl_ratio` (>= 1); at least one. Every budget given must hold for the winner.
- `objective`: "accurate" (lowest mean KL within budget; the default with max_size alone) or
  "smallest" (smallest file within budget; the default when a quality budget is given).
- `presets`: the llama.cpp presets to measure (default PRESETS), `search` (default true):
  also search per-tensor mixtures, `max_candidates`: files made and measured in all (cap).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedTarget
from .ggml_types import FILE_TYPES

AUTO = "auto"
OBJECTIVES = ("accurate", "smallest")
# llama.cpp's presets that need no importance matrix, largest first
PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
DEFAULT_MAX_CANDIDATES = 20
MAX_CANDIDATES = 48
# below this no GGUF with a tokenizer fits (the tests' tiny models are ~1 MB)
MIN_MAX_SIZE = 64 << 10
_KEYS = {"max_size", "max_mean_kl", "max_ppl_ratio", "objective", "presets", "search", "max_candidates",
         "imatrix", "calibration_text", "split_max_size", "gates", "evaluation_text"}


@dataclass(frozen=True)
class AutoBudget:
    max_size: int | None
    max_mean_kl: float | None
    max_ppl_ratio: float | None
    objective: str
    presets: tuple[str, ...] = PRESETS
    search: bool = True
    max_candidates: int = DEFAULT_MAX_CANDIDATES

    def fits(self, *, size_bytes: int, mean_kl: float | None, ppl_ratio: float | None) -> bool:
        """Does a measured candidate satisfy every budget given? Unknown quality never does."""
        if self.max_size is not None and size_bytes > self.max_size:
            return False
        if self.max_mean_kl is not None and (mean_kl is None or not mean_kl <= self.max_mean_kl):
            return False
        return self.max_ppl_ratio is None or (ppl_ratio is not None and ppl_ratio <= self.max_ppl_ratio)

    def to_dict(self) -> dict[str, Any]:
        return {"max_size": self.max_size, "max_mean_kl": self.max_mean_kl, "max_ppl_ratio": self.max_ppl_ratio,
                "objective": self.objective, "presets": list(self.presets), "search": self.search,
                "max_candidates": self.max_candidates}


def _positive(params: Mapping[str, Any], key: str, minimum: float, strict: bool) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise UnsupportedTarget(f"gguf:auto params.{key} must be a finite number {bound}, not {value!r}")
    return float(value)


def _presets(value: Any) -> tuple[str, ...]:
    if value is None:
        return PRESETS
    if not isinstance(value, (list, tuple)) or not value or len(value) > len(PRESETS):
        raise UnsupportedTarget(f"gguf:auto params.presets must be a non-empty list of at most {len(PRESETS)} "
                                f"of {', '.join(PRESETS)}")
    by_lower = {p.lower(): p for p in PRESETS}
    out = []
    for p in value:
        name = by_lower.get(p.strip().lower()) if isinstance(p, str) else None
        if name is None:
            raise UnsupportedTarget(f"gguf:auto params.presets: {p!r} is not one of {', '.join(PRESETS)}")
        out.append(name)
    return tuple(dict.fromkeys(out))


def parse_auto_budget(params: Mapping[str, Any], parse_size) -> AutoBudget:
    """gguf:auto's params as an AutoBudget; UnsupportedTarget naming the bad field."""
    unknown = sorted(set(params) - _KEYS)
    if unknown:
        raise UnsupportedTarget(f"gguf:auto does not take params {', '.join(unknown)}; it takes "
                                f"{', '.join(sorted(_KEYS))}")
    max_size = None if params.get("max_size") is None else parse_size(params["max_size"], what="gguf:auto max_size",
                                                                      minimum=MIN_MAX_SIZE)
    kl = _positive(params, "max_mean_kl", 0.0, strict=True)
    ppl = _positive(params, "max_ppl_ratio", 1.0, strict=False)
    if max_size is None and kl is None and ppl is None:
        raise UnsupportedTarget("gguf:auto needs a budget: params.max_size (e.g. \"100M\"), "
                                "params.max_mean_kl or params.max_ppl_ratio")
    objective = params.get("objective") or ("accurate" if kl is None and ppl is None else "smallest")
    if objective not in OBJECTIVES:
        raise UnsupportedTarget(f"gguf:auto params.objective must be one of {', '.join(OBJECTIVES)}, "
                                f"not {objective!r}")
    search = params.get("search", True)
    if not isinstance(search, bool):
        raise UnsupportedTarget(f"gguf:auto params.search must be true or false, not {search!r}")
    n = params.get("max_candidates", DEFAULT_MAX_CANDIDATES)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CANDIDATES:
        raise UnsupportedTarget(f"gguf:auto params.max_candidates must be an integer in 1..{MAX_CANDIDATES}")
    presets = _presets(params.get("presets"))
    assert all(p in FILE_TYPES for p in presets)
    return AutoBudget(max_size=max_size, max_mean_kl=kl, max_ppl_ratio=ppl, objective=objective,
                      presets=presets, search=search, max_candidates=n)


__all__ = ["AUTO", "AutoBudget", "parse_auto_budget", "PRESETS", "OBJECTIVES"]
