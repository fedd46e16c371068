"""The type that holds most of a model's parameters ("BF16", "Q4_K", ...), as preflight reports it."""

from __future__ import annotations

from collections.abc import Iterable


def dominant_type(sized: Iterable[tuple[str, int]]) -> str:
    """The name with the largest total count over (name, count) pairs; "unknown" when empty."""
    totals: dict[str, int] = {}
    for name, count in sized:
        totals[name] = totals.get(name, 0) + count
    return max(totals, key=totals.__getitem__) if totals else "unknown"
