"""gguf:auto: choose a quantization for a budget by measuring candidates (issue 13).

A pure search over two callables, so it is testable and the worker can run it with stored
artifacts and references:

- `size_of(quantization, overrides) -> int`: bytes the file would take (headers only, cheap:
  quantize.estimate_size);
- `measure(quantization, overrides) -> FrontierPoint`: make the file (ggml's kernels) and
  measure it against the source's evaluation reference (costly; at most budget.max_candidates
  calls, fewer when `known` points are given for presets already made).

Search:
1. presets: every preset of budget.presets whose predicted size fits max_size is measured
   (a "smallest" budget stops at the first preset, smallest first, that meets its quality);
2. mixtures (budget.search): from a base preset, upgrade one tensor group at a time (token
   embedding/output, attn_v, ffn_down, attn_output, attn_q/k, ffn_up/gate) one step up the type
   ladder, greedily by *measured* KL reduction per byte: every group's first step is measured on
   the base, then the best step is applied (its file is measured, so the current KL is exact, not
   assumed additive) and only the next step of that group is measured again. An "accurate" budget
   starts from the most accurate fitting preset under max_size, then (candidates left) from the
   next fitting preset below it, into the room up to max_size; a "smallest" budget starts from
   the largest preset smaller than the smallest passing one, under that preset's size.
3. the winner is the best measured point within every budget (presets included, so it is never
   worse than a fitting preset that was measured); the frontier lists every measured point.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ValidationFailed
from ..frontier import FrontierPoint, mark_pareto
from .auto_budget import AutoBudget
from .tensor_types import Overrides

SizeOf = Callable[[str, Overrides], int]
Measure = Callable[[str, Overrides], FrontierPoint]

# one step up at a time; a step that does not grow the file (fallback types, already there) is skipped
TYPE_LADDER = ("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
# tensor groups in the order llama.cpp's own mixtures favour them; a group no tensor matches is dropped
GROUPS = {
    "output": r"^output\.weight$", "token_embd": r"^token_embd\.weight$", "attn_v": r"attn_v\.weight",
    "ffn_down": r"ffn_down", "attn_output": r"attn_output\.weight", "attn_qk": r"attn_[qk]\.weight",
    "attn_qkv": r"attn_qkv\.weight", "ffn_up_gate": r"ffn_(up|gate)",
}


def mixture_name(quantization: str, overrides: Overrides) -> str:
    """A stable name for a mixture: its base preset and a hash of its overrides."""
    if not overrides:
        return quantization
    digest = hashlib.sha256(json.dumps([quantization, list(overrides)]).encode()).hexdigest()[:8]
    return f"mix:{digest}"


@dataclass
class AutoResult:
    winner: FrontierPoint
    winner_quantization: str  # the base preset (general.file_type) of the winner
    winner_overrides: Overrides
    frontier: list[FrontierPoint]
    measured: int  # files made and measured by this search (known points not counted)
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"winner": self.winner.name, "base": self.winner_quantization,
                "tensor_types": dict(self.winner_overrides), "measured": self.measured,
                "frontier": [{**p.to_dict(), "pareto": ok} for p, ok in mark_pareto(self.frontier)],
                "log": list(self.log)}


class _Search:
    def __init__(self, budget: AutoBudget, size_of: SizeOf, measure: Measure,
                 known: Mapping[str, FrontierPoint]) -> None:
        self.budget, self.size_of, self.measure_fn, self.known = budget, size_of, measure, dict(known)
        self.points: dict[str, tuple[FrontierPoint, str, Overrides]] = {}
        self.measured = 0
        self.log: list[str] = []

    def spent(self) -> bool:
        return self.measured >= self.budget.max_candidates

    def measure(self, quantization: str, overrides: Overrides) -> FrontierPoint:
        name = mixture_name(quantization, overrides)
        if name in self.points:
            return self.points[name][0]
        point = self.known.get(name) if not overrides else None
        if point is None:
            point = self.measure_fn(quantization, overrides)
            self.measured += 1
        self.points[name] = (point, quantization, overrides)
        self.log.append(f"{name} ({quantization} {dict(overrides)}): {point.size_bytes} B, KL {point.mean_kl}")
        return point

    def ok(self, p: FrontierPoint) -> bool:
        return self.budget.fits(size_bytes=p.size_bytes, mean_kl=p.mean_kl, ppl_ratio=p.ppl_ratio)

    def key(self, p: FrontierPoint) -> tuple:
        kl = p.mean_kl if p.mean_kl is not None else float("inf")
        return (kl, p.size_bytes) if self.budget.objective == "accurate" else (p.size_bytes, kl)


def _presets(s: _Search) -> list[str]:
    """Measure the presets; returns those measured, smallest first."""
    b = s.budget
    sized = sorted(((s.size_of(q, ()), q) for q in b.presets))
    chosen = [q for size, q in sized if b.max_size is None or size <= b.max_size]
    if b.objective == "accurate":
        chosen.reverse()  # largest first: the likely winners, if the candidate cap cuts the list
    done = []
    for q in chosen:
        if s.spent() and mixture_name(q, ()) not in s.known:
            break
        p = s.measure(q, ())
        done.append(q)
        if b.objective == "smallest" and s.ok(p):
            break
    return sorted(done, key=lambda q: s.points[q][0].size_bytes)


def _next_step(s: _Search, base: str, current: Overrides, group: str, limit: int) -> tuple[Overrides, int] | None:
    """The group's next type up the ladder that grows the file and stays under `limit`."""
    cur = dict(current)
    pattern = GROUPS[group]
    start = TYPE_LADDER.index(cur[pattern]) + 1 if pattern in cur else 0
    size_now = s.size_of(base, current)
    for t in TYPE_LADDER[start:]:
        trial = tuple(sorted({**cur, pattern: t}.items()))
        size = s.size_of(base, trial)
        if size > size_now:
            return (trial, size) if size <= limit else None
    return None


def _greedy(s: _Search, base: str, groups: Sequence[str], limit: int) -> None:
    """Upgrade groups of `base` greedily by measured KL reduction per byte, under `limit` bytes."""
    current: Overrides = ()
    cur = s.measure(base, current)
    ratio: dict[str, float] = {}  # last measured KL reduction per byte of each group's step
    for g in groups:
        step = _next_step(s, base, current, g, limit)
        if step is None or s.spent():
            continue
        p = s.measure(base, step[0])
        ratio[g] = _gain(cur, p)
    while ratio and not s.spent():
        g = max(ratio, key=lambda k: ratio[k])
        if ratio[g] <= 0:
            break
        step = _next_step(s, base, current, g, limit)
        if step is None:
            del ratio[g]
            continue
        p = s.measure(base, step[0])
        if _gain(cur, p) <= 0 or p.size_bytes > limit:
            del ratio[g]  # the step did not pay on top of the others
            continue
        current, cur = step[0], p
        nxt = _next_step(s, base, current, g, limit)
        ratio[g] = ratio[g] if nxt is not None else 0.0  # its next step's gain: estimated by the last


def _gain(before: FrontierPoint, after: FrontierPoint) -> float:
    if before.mean_kl is None or after.mean_kl is None:
        return 0.0
    grown = after.size_bytes - before.size_bytes
    return (before.mean_kl - after.mean_kl) / grown if grown > 0 else 0.0


def search_auto(*, budget: AutoBudget, tensor_names: Sequence[str], size_of: SizeOf, measure: Measure,
                known: Mapping[str, FrontierPoint] | None = None) -> AutoResult:
    """Run gguf:auto's search (see the module docstring); ValidationFailed when nothing measured
    meets the budget (the message lists what was measured)."""
    s = _Search(budget, size_of, measure, known or {})
    measured = _presets(s)
    groups = [g for g, pat in GROUPS.items() if any(re.search(pat, n) for n in tensor_names)]
    if budget.search and measured:
        fitting = [q for q in measured if s.ok(s.points[q][0])]
        if budget.objective == "accurate" and fitting:
            limit = budget.max_size if budget.max_size is not None else 1 << 62
            base = min(fitting, key=lambda q: s.key(s.points[q][0]))
            _greedy(s, base, groups, limit)
            # the best preset may sit right at the budget with no room left: also upgrade the
            # next preset down into the room between the two
            below = [q for q in fitting if s.points[q][0].size_bytes < s.points[base][0].size_bytes]
            if below and not s.spent():
                _greedy(s, below[-1], groups, limit)
        elif budget.objective == "smallest" and fitting:
            best = min(fitting, key=lambda q: s.points[q][0].size_bytes)
            smaller = [q for q in measured if s.points[q][0].size_bytes < s.points[best][0].size_bytes]
            if smaller:
                _greedy(s, smaller[-1], groups, s.points[best][0].size_bytes - 1)
    ok = [(p, q, o) for p, q, o in s.points.values() if s.ok(p)]
    if not ok:
        seen = "; ".join(f"{p.name}: {p.size_bytes} B, mean KL {p.mean_kl}, PPL ratio {p.ppl_ratio}"
                         for p, _, _ in s.points.values())
        raise ValidationFailed(f"gguf:auto: no candidate meets the budget {budget.to_dict()}; measured: {seen or 'none'}")
    winner, q, o = min(ok, key=lambda t: s.key(t[0]))
    return AutoResult(winner=winner, winner_quantization=q, winner_overrides=o,
                      frontier=[p for p, _, _ in s.points.values()], measured=s.measured, log=s.log)


__all__ = ["search_auto", "AutoResult", "mixture_name", "GROUPS", "TYPE_LADDER"]
