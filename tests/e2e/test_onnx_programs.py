"""Program sources through the production-shaped service (Postgres, Redis, S3, a Celery worker):
a torch.export .pt2 to onnx fp32 + int8-dynamic and an .onnx to int8-dynamic; the downloaded
artifacts are re-checked here with onnxruntime against the torch module / the source .onnx."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import upload, wait_for_job

pytestmark = pytest.mark.e2e


def _mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 32)).eval()


def _archive(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return dest


def _run_job(client, source_id: str, targets: list[str], tmp_path: Path, stack) -> dict:
    created = client.post("/v1/jobs", json={"source": source_id, "targets": targets})
    assert created.status_code == 202, created.text
    job, _ = wait_for_job(client, created.json()["id"], timeout_s=600)
    assert job["status"] == "succeeded", (job, stack.logs())
    out = {}
    for artifact_id in job["artifact_ids"]:
        meta = client.get(f"/v1/artifacts/{artifact_id}").json()
        data = client.get(f"/v1/artifacts/{artifact_id}/download", follow_redirects=True).content
        assert hashlib.sha256(data).hexdigest() == meta["sha256"]
        path = tmp_path / f"{source_id}-{meta['filename']}"
        path.write_bytes(data)
        out[meta["quantization"]] = (meta, path)
    return out


def _ort(path: Path, feeds: dict) -> list:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _cosine_min(a, b) -> float:
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_pt2_and_onnx_programs(production_stack, tmp_path):
    import torch

    mlp = _mlp()
    pt2_dir, onnx_dir = tmp_path / "pt2", tmp_path / "onnx"
    pt2_dir.mkdir()
    onnx_dir.mkdir()
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(mlp, (torch.randn(2, 64),), dynamic_shapes=({0: batch},)),
                      pt2_dir / "mlp.pt2")
    torch.onnx.export(mlp, (torch.randn(2, 64),), dynamo=True, input_names=["features"],
                      dynamic_shapes=({0: batch},), verbose=False).save(str(onnx_dir / "mlp.onnx"))

    with production_stack.client() as client:
        pt2_source = upload(client, _archive(pt2_dir, tmp_path / "pt2.tar.gz"), "mlp-pt2")
        assert pt2_source["architecture"] == "torch.export"
        refused = client.post("/v1/jobs", json={"source": pt2_source["id"], "targets": ["gguf:Q8_0"]})
        assert refused.status_code == 422 and "Hugging Face folder" in refused.json()["error"]["message"]
        from_pt2 = _run_job(client, pt2_source["id"], ["onnx:fp32", "onnx:int8-dynamic"], tmp_path, production_stack)
        onnx_source = upload(client, _archive(onnx_dir, tmp_path / "onnx.tar.gz"), "mlp-onnx")
        assert onnx_source["architecture"] == "onnx"
        from_onnx = _run_job(client, onnx_source["id"], ["onnx:int8-dynamic"], tmp_path, production_stack)

    x = np.random.default_rng(5).standard_normal((6, 64)).astype(np.float32)
    with torch.no_grad():
        ref = mlp(torch.from_numpy(x)).numpy()
    (meta, fp32), (meta8, int8) = from_pt2["fp32"], from_pt2["int8-dynamic"]
    assert meta["metadata"]["source_kind"] == "torch.export" and meta["metadata"]["task"] == "program"
    assert {"max_abs_diff", "cosine_min", "latency_ms_p50", "compression_vs_fp32"} <= set(meta8["metrics"])
    (name,) = [i.name for i in __import__("onnxruntime").InferenceSession(str(fp32)).get_inputs()]
    assert np.abs(_ort(fp32, {name: x})[0] - ref).max() < 1e-4
    assert _cosine_min(_ort(int8, {name: x})[0], ref) > 0.99
    assert meta8["size_bytes"] < 0.4 * meta["size_bytes"]
    onnx_meta, onnx_int8 = from_onnx["int8-dynamic"]
    assert onnx_meta["metadata"]["source_kind"] == "onnx"
    (src_out,) = _ort(onnx_dir / "mlp.onnx", {"features": x})
    assert _cosine_min(_ort(onnx_int8, {"features": x})[0], src_out) > 0.99
