"""The size/quality frontier of one source's artifacts (issue 13: compare, gguf:auto).

A `FrontierPoint` is one candidate (a preset such as "Q4_K_M" or a searched per-tensor mixture
"mix:<hash8>") with its size and measured damage. `mark_pareto` says which points are worth
having: a point is dominated when another is no larger and no worse, and strictly better in one.
Equal points dominate neither, so ties are all kept.

Stdlib only: the API imports this to answer GET /v1/sources/{id}/frontier.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

LOSSES = ("mean_kl", "ppl_ratio")


@dataclass(frozen=True)
class FrontierPoint:
    name: str
    size_bytes: int
    bits_per_weight: float | None
    mean_kl: float | None
    ppl_ratio: float | None = None
    artifact_id: str | None = None
    tensor_types: Mapping[str, str] | None = None
    # Optional extras shown with the point (speed, top-1, ...); never used for dominance.
    extra: Mapping[str, Any] | None = None

    def loss(self, loss: str = "mean_kl") -> float | None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
        value = getattr(self, loss)
        # A NaN or missing measurement cannot be ranked; treat both as unknown.
        if value is None or not math.isfinite(value):
            return None
        return float(value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size_bytes": int(self.size_bytes),
            "bits_per_weight": _num(self.bits_per_weight),
            "mean_kl": _num(self.mean_kl),
            "ppl_ratio": _num(self.ppl_ratio),
            "artifact_id": self.artifact_id,
            "tensor_types": dict(sorted(self.tensor_types.items())) if self.tensor_types else None,
            **({k: v for k, v in self.extra.items()} if self.extra else {}),
        }


def _num(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _dominates(a: FrontierPoint, b: FrontierPoint, loss: str) -> bool:
    la, lb = a.loss(loss), b.loss(loss)
    assert la is not None and lb is not None
    no_worse = a.size_bytes <= b.size_bytes and la <= lb
    return no_worse and (a.size_bytes < b.size_bytes or la < lb)


def mark_pareto(points: Iterable[FrontierPoint], *, loss: str = "mean_kl") -> list[tuple[FrontierPoint, bool]]:
    """Each point with whether it is Pareto-optimal in (size, loss), in the order given.

    A point whose loss is unknown is listed but never optimal (it cannot be compared).
    O(n^2) on purpose: a frontier holds tens of points.
    """
    pts = list(points)
    known = [p for p in pts if p.loss(loss) is not None]
    out = []
    for p in pts:
        if p.loss(loss) is None:
            out.append((p, False))
            continue
        out.append((p, not any(_dominates(q, p, loss) for q in known if q is not p)))
    return out
