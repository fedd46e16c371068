"""Quality gates (engine/gates.py): parsed strictly with the target, checked against a report."""

from __future__ import annotations

import math

import pytest

from quantyard.engine.errors import UnsupportedTarget, ValidationFailed
from quantyard.engine.gates import GateFailed, check_gates, parse_gates
from quantyard.engine.spec import parse_target

REPORT = {"mean_kl": 0.12, "top1_agreement": 0.8, "ppl_ratio": 1.2}


def test_gates_parse_and_travel_with_the_target():
    spec = parse_target({"format": "gguf", "quantization": "Q2_K",
                         "params": {"gates": {"max_mean_kl": 0.05, "min_top1": 1, "max_ppl_ratio": 1.05}}})
    assert parse_gates(spec.params["gates"], fmt="gguf") == {"max_mean_kl": 0.05, "min_top1": 1.0,
                                                            "max_ppl_ratio": 1.05}


@pytest.mark.parametrize(("gates", "named"), [
    ({"max_kl": 0.1}, "params.gates.max_kl: unknown gate"),
    ({"min_top1": 1.5}, "params.gates.min_top1"),
    ({"max_mean_kl": -0.1}, "params.gates.max_mean_kl"),
    ({"max_mean_kl": math.nan}, "params.gates.max_mean_kl"),
    ({"max_ppl_ratio": "1.05"}, "params.gates.max_ppl_ratio"),
    ({"min_top1": True}, "params.gates.min_top1"),
    ([0.1], "params.gates must be an object"),
])
def test_a_bad_gate_is_refused_naming_it(gates, named):
    with pytest.raises(UnsupportedTarget, match=named.replace(".", r"\.")):
        parse_target({"format": "gguf", "quantization": "Q4_K_M", "params": {"gates": gates}})


def test_gates_on_a_target_without_a_quality_report_are_refused():
    with pytest.raises(UnsupportedTarget, match="gguf targets"):
        parse_target({"format": "onnx", "quantization": "int8-dynamic", "params": {"gates": {"min_top1": 0.5}}})


def test_a_report_outside_its_gate_fails_with_the_numbers():
    with pytest.raises(GateFailed) as err:
        check_gates({"max_mean_kl": 0.05, "min_top1": 0.9, "max_ppl_ratio": 1.5}, REPORT, target="gguf:Q2_K")
    assert isinstance(err.value, ValidationFailed) and err.value.code == "quality_gate_failed"
    assert "mean_kl 0.12 > max_mean_kl 0.05" in err.value.message
    assert "top1_agreement 0.8 < min_top1 0.9" in err.value.message
    assert "ppl_ratio" not in err.value.message  # 1.2 is inside 1.5
    assert err.value.details["measured"] == {"mean_kl": 0.12, "top1_agreement": 0.8, "ppl_ratio": 1.2}


def test_a_report_inside_its_gate_passes_and_a_missing_number_fails():
    check_gates({"max_mean_kl": 0.12, "min_top1": 0.8}, REPORT, target="t")  # bounds are inclusive
    check_gates({}, None, target="t")
    with pytest.raises(GateFailed, match="ppl_ratio not measured"):
        check_gates({"max_ppl_ratio": 2.0}, {"mean_kl": 0.1, "ppl_ratio": None}, target="t")
    with pytest.raises(GateFailed, match="mean_kl not measured"):
        check_gates({"max_mean_kl": 1.0}, None, target="t")
