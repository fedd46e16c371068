"""mark_pareto: the dominance rule on hand-made points (the rule itself is the oracle here)."""

from __future__ import annotations

import math

import pytest

from quantyard.engine.frontier import FrontierPoint, mark_pareto


def _p(name, size, kl, ppl=None):
    return FrontierPoint(name=name, size_bytes=size, bits_per_weight=None, mean_kl=kl, ppl_ratio=ppl)


def test_dominated_points_are_marked_and_order_kept():
    pts = [_p("Q8_0", 800, 0.001), _p("Q4_K_M", 400, 0.05), _p("Q4_K_S", 420, 0.06),  # Q4_K_S dominated
           _p("Q2_K", 250, 0.4), _p("mix:aa", 400, 0.04)]  # mix beats Q4_K_M at equal size
    marked = mark_pareto(pts)
    assert [p.name for p, _ in marked] == [p.name for p in pts]
    assert {p.name: ok for p, ok in marked} == {
        "Q8_0": True, "Q4_K_M": False, "Q4_K_S": False, "Q2_K": True, "mix:aa": True}


def test_ties_are_kept_and_unknown_loss_is_never_optimal():
    pts = [_p("a", 100, 0.1), _p("b", 100, 0.1), _p("c", 50, None), _p("d", 60, math.nan)]
    assert [ok for _, ok in mark_pareto(pts)] == [True, True, False, False]


def test_ppl_ratio_loss_and_bad_loss_name():
    pts = [_p("a", 100, 0.1, 1.20), _p("b", 200, 0.2, 1.10)]
    assert [ok for _, ok in mark_pareto(pts, loss="ppl_ratio")] == [True, True]
    assert [ok for _, ok in mark_pareto(pts)] == [True, False]
    with pytest.raises(ValueError, match="unknown loss"):
        mark_pareto(pts, loss="top1")


def test_to_dict_is_json_safe():
    p = FrontierPoint(name="mix:1", size_bytes=10, bits_per_weight=4.5, mean_kl=math.inf, ppl_ratio=None,
                      tensor_types={"ffn_down": "q6_k", "attn_v": "q8_0"}, extra={"tg_tokens_per_s": 12.0})
    d = p.to_dict()
    assert d["mean_kl"] is None and d["tensor_types"] == {"attn_v": "q8_0", "ffn_down": "q6_k"}
    assert d["tg_tokens_per_s"] == 12.0
