"""Quality gates (issue 13): a target's `params.gates` bound what its quality report may show.

    {"gates": {"max_mean_kl": 0.05, "min_top1": 0.9, "max_ppl_ratio": 1.05}}

`parse_gates` checks a job's gates when it is submitted (spec.parse_target calls it, so a bad
gate is a 422 naming it, like a bad split size); `check_gates` holds a measured report
(evaluation.QualityReport.to_dict()) to them after conversion: a target outside its gate fails
with the measured numbers and nothing is published for it.

Stdlib only: the API imports this through spec.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import UnsupportedTarget, ValidationFailed

# gate key -> (the report field it reads, "max" or "min", the range a value may take)
GATES: dict[str, tuple[str, str, tuple[float, float]]] = {
    "max_mean_kl": ("mean_kl", "max", (0.0, math.inf)),
    "min_top1": ("top1_agreement", "min", (0.0, 1.0)),
    "max_ppl_ratio": ("ppl_ratio", "max", (0.0, math.inf)),
}
# Formats whose artifacts get a quality report the gates can read.
GATED_FORMATS = ("gguf",)


class GateFailed(ValidationFailed):
    """The artifact was made and measured, and its quality is outside the target's gate."""

    code = "quality_gate_failed"


def parse_gates(value: Any, *, fmt: str) -> dict[str, float]:
    """A target's params.gates as {gate: float}; UnsupportedTarget naming the gate that is
    unknown or not a finite number in its range."""
    if not isinstance(value, Mapping):
        raise UnsupportedTarget("params.gates must be an object such as {\"max_mean_kl\": 0.05}")
    if value and fmt not in GATED_FORMATS:
        raise UnsupportedTarget(f"params.gates: quality gates apply to {', '.join(GATED_FORMATS)} targets "
                                f"(their quality report), not {fmt}")
    gates = {}
    for key, number in value.items():
        if key not in GATES:
            raise UnsupportedTarget(f"params.gates.{str(key)[:40]}: unknown gate; valid gates: {', '.join(GATES)}")
        low, high = GATES[key][2]
        ok = isinstance(number, int | float) and not isinstance(number, bool) and math.isfinite(number)
        if not ok or not low <= number <= high:
            bound = f"between {low:g} and {high:g}" if math.isfinite(high) else f"at least {low:g}"
            raise UnsupportedTarget(f"params.gates.{key}: {repr(number)[:40]} is not a finite number {bound}")
        gates[key] = float(number)
    return gates


def target_gates(params: Mapping[str, Any], *, fmt: str) -> dict[str, float]:
    """The gates a target's params ask for ({} when none)."""
    return parse_gates(params["gates"], fmt=fmt) if "gates" in params else {}


def gate_failures(gates: Mapping[str, float], quality: Mapping[str, Any]) -> list[str]:
    """One line per gate the report misses ("mean_kl 0.1234 > max_mean_kl 0.05"); a number the
    report lacks fails its gate too (a gate that cannot be checked does not pass)."""
    failures = []
    for key, bound in gates.items():
        field, side, _ = GATES[key]
        measured = quality.get(field)
        if not isinstance(measured, int | float) or isinstance(measured, bool) or not math.isfinite(measured):
            failures.append(f"{field} not measured (gate {key} {bound:g})")
        elif side == "max" and measured > bound:
            failures.append(f"{field} {measured:.6g} > {key} {bound:g}")
        elif side == "min" and measured < bound:
            failures.append(f"{field} {measured:.6g} < {key} {bound:g}")
    return failures


def check_gates(gates: Mapping[str, float], quality: Mapping[str, Any] | None, *, target: str) -> None:
    """GateFailed with the measured numbers when `quality` is outside `gates`."""
    if not gates:
        return
    failures = gate_failures(gates, quality or {})
    if failures:
        measured = {GATES[k][0]: (quality or {}).get(GATES[k][0]) for k in gates}
        raise GateFailed(f"{target} is outside its quality gate: {'; '.join(failures)}",
                         details={"gates": dict(gates), "measured": measured})


__all__ = ["GATES", "GateFailed", "check_gates", "gate_failures", "parse_gates", "target_gates"]
