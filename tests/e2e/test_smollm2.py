"""A real trained model through the production-shaped service: SmolLM2-135M to Q8_0, Q4_K_M and
Q2_K in one job. Every artifact carries its size, bits per weight, and its KL divergence and
top-1 agreement against the source model on a fixed evaluation text; the numbers are checked
here against llama.cpp and transformers run by the test itself."""

from __future__ import annotations

import hashlib
import tarfile

import pytest

from tests import oracles
from tests.e2e.conftest import wait_for_job

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm2_archive(smollm2_dir, tmp_path_factory):
    archive = tmp_path_factory.mktemp("smollm2") / "smollm2.tar"  # bf16 barely compresses
    with tarfile.open(archive, "w") as tar:
        for path in sorted(smollm2_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def test_smollm2_three_quantizations_with_metrics(production_stack, smollm2_dir,
                                                  smollm2_archive, tmp_path):
    with production_stack.client() as client:
        response = client.post("/v1/sources", params={"name": "SmolLM2-135M-Instruct"},
                               content=smollm2_archive.read_bytes(),
                               headers={"Content-Type": "application/x-tar"})
        assert response.status_code == 201, response.text
        source = response.json()
        created = client.post("/v1/jobs", json={"source": source["id"],
                                                "targets": ["gguf:Q8_0", "gguf:Q4_K_M",
                                                            "gguf:Q2_K"]})
        assert created.status_code == 202, created.text
        job, _ = wait_for_job(client, created.json()["id"], timeout_s=900)
        assert job["status"] == "succeeded", (job, production_stack.logs())
        artifacts = {a["quantization"]: a for a in
                     (client.get(f"/v1/artifacts/{i}").json() for i in job["artifact_ids"])}
        (intermediate_id,) = job["intermediate_artifact_ids"]
        intermediate = client.get(f"/v1/artifacts/{intermediate_id}").json()
        assert intermediate["quantization"] == "BF16"  # the source's own precision

        q4 = client.get(f"/v1/artifacts/{artifacts['Q4_K_M']['id']}/download",
                        follow_redirects=True)
        q4_path = tmp_path / "smollm2-Q4_K_M.gguf"
        q4_path.write_bytes(q4.content)
        assert hashlib.sha256(q4.content).hexdigest() == artifacts["Q4_K_M"]["sha256"]

    sizes = []
    for quant in ("Q8_0", "Q4_K_M", "Q2_K"):
        metrics = artifacts[quant]["metrics"]
        for key in ("size_bytes", "bits_per_weight", "mean_kl", "top1_agreement"):
            assert key in metrics, (quant, metrics)
        assert metrics["size_bytes"] == artifacts[quant]["size_bytes"]
        sizes.append(metrics["size_bytes"])
        print(f"{quant}: {metrics['size_bytes']:,} B, {metrics['bits_per_weight']:.2f} bpw, "
              f"KL {metrics['mean_kl']:.4f}, top-1 {metrics['top1_agreement']:.3f}")
    assert sizes == sorted(sizes, reverse=True)
    kl = {q: artifacts[q]["metrics"]["mean_kl"] for q in artifacts}
    assert kl["Q8_0"] < kl["Q4_K_M"] < kl["Q2_K"]
    assert kl["Q8_0"] < 0.01 and artifacts["Q8_0"]["metrics"]["top1_agreement"] > 0.9
    assert 8.0 < artifacts["Q8_0"]["metrics"]["bits_per_weight"] < 9.0

    # The recorded numbers are what an independent run of both runtimes measures on the same
    # evaluation text.
    from quantyard.engine.gguf.validate import PROBE_TEXT

    check = oracles.compare(smollm2_dir, q4_path, text=PROBE_TEXT)
    assert check.llama_ids == check.hf_ids
    assert check.mean_kl == pytest.approx(kl["Q4_K_M"], rel=0.1)
    assert check.top1_agreement == pytest.approx(artifacts["Q4_K_M"]["metrics"]["top1_agreement"],
                                                 abs=0.05)
