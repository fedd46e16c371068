"""ONNX through the production-shaped service: all-MiniLM-L6-v2 (a real sentence-transformers
model from PyPI) to fp32 and int8-dynamic in one job; the downloaded artifacts are checked
again here with onnxruntime against PyTorch on sentences the engine never saw."""

from __future__ import annotations

import hashlib
import tarfile

import pytest

from tests.e2e.conftest import wait_for_job
from tests.engine.onnx import oracle

pytestmark = pytest.mark.e2e


def test_minilm_to_onnx_fp32_and_int8(production_stack, minilm_dir, tmp_path):
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
                                                "targets": ["onnx:fp32", "onnx:int8-dynamic"]})
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

    fp32, int8 = artifacts["fp32"], artifacts["int8-dynamic"]
    assert fp32[0]["format"] == int8[0]["format"] == "onnx"
    for meta, _ in (fp32, int8):
        for key in ("max_abs_diff", "size_bytes"):
            assert key in meta["metrics"], meta["metrics"]
    assert int8[0]["size_bytes"] < 0.3 * fp32[0]["size_bytes"]

    out, ref, mask = oracle.embeddings(fp32[1], minilm_dir)
    assert oracle.max_diff_real_tokens(out, ref, mask) < 1e-4
    out, ref, mask = oracle.embeddings(int8[1], minilm_dir)
    assert oracle.pooled_cosines(out, ref, mask).min() > 0.98
