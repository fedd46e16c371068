"""ONNX through the production-shaped service: all-MiniLM-L6-v2 (a real sentence-transformers
model from PyPI) to all five ONNX targets in one job; the downloaded artifacts are checked
again here with onnxruntime against PyTorch on sentences the engine never saw."""

from __future__ import annotations

import hashlib
import tarfile

import pytest

from tests.e2e.conftest import wait_for_job
from tests.engine.onnx import oracle

pytestmark = pytest.mark.e2e

QUANTS = ("fp32", "fp16", "int8-dynamic", "int8-static", "int4")


def test_minilm_to_every_onnx_target(production_stack, minilm_dir, tmp_path):
    archive = tmp_path / "minilm.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(minilm_dir.iterdir()):
            tar.add(path, arcname=path.name)
    with production_stack.client() as client:
        response = client.post("/v1/sources", params={"name": "all-MiniLM-L6-v2"},
                               content=archive.read_bytes(),
                               headers={"Content-Type": "application/gzip"})
        assert response.status_code == 201, response.text
        created = client.post("/v1/jobs", json={"source": response.json()["id"],
                                                "targets": [f"onnx:{q}" for q in QUANTS]})
        assert created.status_code == 202, created.text
        job, _ = wait_for_job(client, created.json()["id"], timeout_s=600)
        assert job["status"] == "succeeded", (job, production_stack.logs())
        assert job["intermediate_artifact_ids"] == []  # no GGUF intermediate for ONNX
        artifacts = {}
        for artifact_id in job["artifact_ids"]:
            meta = client.get(f"/v1/artifacts/{artifact_id}").json()
            data = client.get(f"/v1/artifacts/{artifact_id}/download", follow_redirects=True)
            assert hashlib.sha256(data.content).hexdigest() == meta["sha256"]
            path = tmp_path / meta["filename"]
            path.write_bytes(data.content)
            artifacts[meta["quantization"]] = (meta, path)

    assert set(artifacts) == set(QUANTS)
    fp32_size = artifacts["fp32"][0]["size_bytes"]
    for quant, (meta, path) in artifacts.items():
        m = meta["metrics"]
        assert meta["format"] == "onnx" and m["size_bytes"] == meta["size_bytes"]
        # validated by the worker against PyTorch, timed there, on a named hardware class
        assert m["samples"] >= 4 and m["max_abs_diff"] <= m["tolerance_max_abs_diff"]
        assert m["cosine_min"] >= m["tolerance_min_cosine"]
        assert m["latency_ms_p50"] > 0 and m["latency_ms_p90"] >= m["latency_ms_p50"]
        assert m["throughput_seq_per_s"] > 0
        assert meta["metadata"]["made_on"]["hardware_class"] == "cpu"
        assert m["compression_vs_fp32"] == pytest.approx(fp32_size / meta["size_bytes"], rel=1e-4)
        # the test's own oracle: transformers on sentences the engine never saw
        out, ref, mask = oracle.embeddings(path, minilm_dir)
        cosine = oracle.pooled_cosines(out, ref, mask).min()
        if quant == "fp32":
            assert oracle.max_diff_real_tokens(out, ref, mask) < 1e-4
        else:
            assert cosine >= {"fp16": 0.9999, "int8-dynamic": 0.99, "int8-static": 0.97, "int4": 0.93}[quant]
    assert 0.2 < artifacts["int8-dynamic"][0]["size_bytes"] / fp32_size < 0.3  # int8 ≈ 1/4 of fp32
    assert 0.45 < artifacts["fp16"][0]["size_bytes"] / fp32_size < 0.55
