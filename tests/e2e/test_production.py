"""The whole service in production shape: uvicorn API + Celery worker processes on Postgres,
Redis and an S3 server. A tiny Llama goes in over HTTP; validated GGUFs come out."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time

import boto3
import pytest
import sqlalchemy as sa

from tests import oracles
from tests.e2e.conftest import upload, wait_for_job

pytestmark = pytest.mark.e2e


def _s3(s3_server):
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url,
                        aws_access_key_id=s3_server.access_key,
                        aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")


def test_two_targets_become_validated_artifacts_in_s3(production_stack, tiny_llama_dir,
                                                      tiny_llama_archive, s3_server,
                                                      postgres_url, tmp_path):
    with production_stack.client() as client:
        source = upload(client, tiny_llama_archive, "tiny-llama")
        assert source["sha256"] == hashlib.sha256(tiny_llama_archive.read_bytes()).hexdigest()

        created = client.post("/v1/jobs", json={"source": source["id"],
                                                "targets": ["gguf:F32", "gguf:Q8_0"]})
        assert created.status_code == 202, created.text
        assert created.headers["Location"].endswith(created.json()["id"])
        job, seen = wait_for_job(client, created.json()["id"])

        assert job["status"] == "succeeded", (job, production_stack.logs())
        statuses = [s["status"] for s in seen]
        assert statuses[-1] == "succeeded"
        assert set(statuses) <= {"queued", "running", "succeeded"}
        progresses = [s["progress"] for s in seen if s["status"] == "running"]
        assert progresses == sorted(progresses) and job["progress"] == 1.0
        assert [t["status"] for t in job["targets"]] == ["succeeded", "succeeded"]
        assert len(job["artifact_ids"]) == 2

        artifacts = {a["quantization"]: a for a in
                     (client.get(f"/v1/artifacts/{i}").json() for i in job["artifact_ids"])}
        assert set(artifacts) == {"F32", "Q8_0"}

        s3 = _s3(s3_server)
        for artifact in artifacts.values():
            assert artifact["format"] == "gguf" and artifact["job_id"] == job["id"]
            assert artifact["source_id"] == source["id"]
            key = artifact["uri"].split(f"s3://{s3_server.bucket}/", 1)[1]
            body = s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
            assert len(body) == artifact["size_bytes"]
            assert hashlib.sha256(body).hexdigest() == artifact["sha256"]
            assert body[:4] == b"GGUF"

            lineage = client.get(f"/v1/artifacts/{artifact['id']}/lineage").json()
            upstream = lineage["upstream"]
            assert (upstream[-1]["type"], upstream[-1]["id"]) == ("source", source["id"])
            assert upstream[0]["recipe"]["target"]["quantization"] == artifact["quantization"]
            assert upstream[0]["recipe"]["input_sha256"] == source["sha256"]
            if artifact["quantization"] == "Q8_0":  # made from the lossless F32 intermediate
                assert upstream[0]["id"] == artifacts["F32"]["id"]

        # Nothing is left under temporary keys once the job is done.
        leftovers = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="tmp/").get("KeyCount", 0)
        assert leftovers == 0

        # The F32 artifact, downloaded through the API, is the source model in llama.cpp.
        download = client.get(f"/v1/artifacts/{artifacts['F32']['id']}/download",
                              follow_redirects=True)
        assert download.status_code == 200
        gguf_path = tmp_path / "model-f32.gguf"
        gguf_path.write_bytes(download.content)
        assert hashlib.sha256(download.content).hexdigest() == artifacts["F32"]["sha256"]

    result = oracles.compare(tiny_llama_dir, gguf_path)
    assert result.llama_ids == result.hf_ids
    assert result.top1_agreement == 1.0
    assert result.max_abs_diff < 0.01

    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT action, resource_type, resource_id FROM audit_events ORDER BY seq")).all()
    engine.dispose()
    actions = {(r.action, r.resource_id) for r in rows}
    assert any(a.startswith("source.") and rid == source["id"] for a, rid in actions), rows
    assert any(a == "job.create" and rid == job["id"] for a, rid in actions), rows


def test_corrupt_safetensors_fails_the_job_cleanly(production_stack, tiny_llama_dir, tmp_path,
                                                   s3_server):
    archive = tmp_path / "corrupt.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(tiny_llama_dir.iterdir()):
            if path.suffix == ".safetensors":
                data = b"\xff" * 8 + b"{not json" + path.read_bytes()[64:1024]
                info = tarfile.TarInfo(path.name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(path, arcname=path.name)
    with production_stack.client() as client:
        source = upload(client, archive, "corrupt")
        created = client.post("/v1/jobs", json={"source": source["id"], "targets": ["gguf:F16"]})
        job, _ = wait_for_job(client, created.json()["id"], timeout_s=120)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_model"
    assert "safetensors" in job["error"]["message"]
    assert job["artifact_ids"] == []
    keys = _s3(s3_server).list_objects_v2(Bucket=s3_server.bucket,
                                          Prefix=f"artifacts/{job['id']}").get("KeyCount", 0)
    assert keys == 0


def test_unsupported_architecture_fails_fast_naming_supported(production_stack, tmp_path):
    import json

    archive = tmp_path / "bloom.tar.gz"
    config = json.dumps({"architectures": ["BloomForCausalLM"], "model_type": "bloom"}).encode()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("config.json")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
    with production_stack.client() as client:
        source = upload(client, archive, "bloom")
        started = time.monotonic()
        created = client.post("/v1/jobs", json={"source": source["id"], "targets": ["gguf:Q8_0"]})
        job, _ = wait_for_job(client, created.json()["id"], timeout_s=120)
        elapsed = time.monotonic() - started
    assert job["status"] == "failed"
    assert job["error"]["code"] == "unsupported_architecture"
    assert "BloomForCausalLM" in job["error"]["message"]
    assert "LlamaForCausalLM" in job["error"]["message"]
    assert elapsed < 30


def test_job_for_a_class_without_workers_stays_queued_and_says_so(production_stack,
                                                                   tiny_llama_archive):
    with production_stack.client() as client:
        source = upload(client, tiny_llama_archive, "tiny-llama")
        created = client.post("/v1/jobs", json={"source": source["id"], "targets": ["gguf:F16"],
                                                "hardware_class": "cuda"})
        assert created.status_code == 202
        time.sleep(3)
        job = client.get(f"/v1/jobs/{created.json()['id']}").json()
        assert job["status"] == "queued"
        assert "cuda" in job["waiting_reason"]
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.json()["status"] == "cancelled"
