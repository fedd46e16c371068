"""POST /v1/jobs checks each target's quality gates (params.gates) when the job is submitted: an
unknown gate or a bad number is a 422 naming it, and nothing is queued."""

from __future__ import annotations

import pytest

from tests.api.conftest import broker_messages
from tests.api.test_jobs import submit


@pytest.mark.parametrize(("gates", "named"), [
    ({"max_kl": 0.05}, "targets[1]: params.gates.max_kl: unknown gate"),
    ({"min_top1": 2}, "targets[1]: params.gates.min_top1"),
    ({"max_ppl_ratio": "1.05"}, "targets[1]: params.gates.max_ppl_ratio"),
])
def test_a_bad_gate_is_a_422_naming_it(client, settings, source, gates, named):
    r = submit(client, source["id"], ["gguf:Q8_0", {"format": "gguf", "quantization": "Q2_K",
                                                     "params": {"gates": gates}}])
    assert r.status_code == 422, r.text
    assert named in r.json()["error"]["message"]
    assert broker_messages(settings) == []


def test_good_gates_are_accepted_and_kept_with_the_target(client, source):
    gates = {"max_mean_kl": 0.05, "min_top1": 0.9, "max_ppl_ratio": 1.05}
    r = submit(client, source["id"], [{"format": "gguf", "quantization": "Q4_K_M", "params": {"gates": gates}}])
    assert r.status_code == 202, r.text
    assert r.json()["targets"][0]["params"]["gates"] == gates
