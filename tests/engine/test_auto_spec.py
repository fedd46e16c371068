"""gguf:auto target validation: a bad budget is refused at submission, naming the field."""

from __future__ import annotations

import pytest

from quantyard.engine import UnsupportedTarget, parse_target
from quantyard.engine.gguf.auto_budget import PRESETS, parse_auto_budget
from quantyard.engine.plan import plan_conversion, wants_imatrix
from quantyard.engine.spec import parse_size


def _auto(**params):
    return parse_target({"format": "gguf", "quantization": "Auto", "params": params})


def test_budget_defaults_and_canonical_spelling():
    spec = _auto(max_size="100M")
    assert spec.key == "gguf:auto"
    b = parse_auto_budget(spec.params, parse_size)
    assert (b.max_size, b.objective, b.presets, b.search) == (100 << 20, "accurate", PRESETS, True)
    q = parse_auto_budget(_auto(max_mean_kl=0.05, presets=["q4_k_m", "Q8_0"]).params, parse_size)
    assert (q.objective, q.presets, q.max_mean_kl) == ("smallest", ("Q4_K_M", "Q8_0"), 0.05)
    assert q.fits(size_bytes=1, mean_kl=0.05, ppl_ratio=None) and not q.fits(size_bytes=1, mean_kl=None,
                                                                              ppl_ratio=None)


@pytest.mark.parametrize("params, words", [
    ({}, "needs a budget"), ({"max_size": "10K"}, "max_size '10K' is below the minimum of 65536"),
    ({"max_size": "big"}, "not a size"), ({"max_mean_kl": 0}, "max_mean_kl must be a finite number > 0"),
    ({"max_ppl_ratio": 0.99}, ">= 1"), ({"max_mean_kl": float("nan")}, "finite"),
    ({"max_size": "1G", "objective": "fast"}, "objective must be one of"),
    ({"max_size": "1G", "presets": ["Q4_K_M", "IQ2_XXS"]}, "'IQ2_XXS' is not one of"),
    ({"max_size": "1G", "max_candidates": 1000}, "max_candidates"),
    ({"max_size": "1G", "tensor_types": {"attn_v": "q8_0"}}, "does not take params tensor_types"),
    ({"max_size": "1G", "bogus": 1}, "does not take params bogus"),
])
def test_bad_budget_is_refused(params, words):
    with pytest.raises(UnsupportedTarget, match=words):
        _auto(**params)


def test_auto_is_planned_from_the_intermediate():
    spec = _auto(max_size="100M")
    assert not wants_imatrix(spec) and wants_imatrix(_auto(max_size="100M", imatrix=True))
    plan = plan_conversion(source_sha256="a" * 64, targets=[spec])
    assert plan.step(plan.targets[0]).inputs == ("intermediate", "reference")
