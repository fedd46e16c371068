"""The worker pipeline in-process on a real SQLite catalog and local object store (no Celery):
claim semantics, cancellation, redelivery after a crash, cleanup on failure."""

from __future__ import annotations

import tarfile
import threading
import time
from pathlib import Path

import pytest

from quantyard import catalog
from quantyard.settings import Settings
from worker.pipeline import run_job
from worker.runtime import build_runtime


@pytest.fixture
def runtime(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", job_lease_s=3, job_max_attempts=2)
    settings.data_dir.mkdir()
    catalog.upgrade_database(settings.resolved_database_url)
    return build_runtime(settings, worker_id="test-worker")


@pytest.fixture
def source_id(runtime, tiny_llama_dir, tmp_path) -> str:
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_llama_dir, arcname="tiny-llama")  # wrapped in a folder on purpose
    stored = runtime.store.put_file("sources/test/source.tar.gz", archive)
    with runtime.session() as s:
        source = catalog.create_source(
            s, name="tiny-llama", sha256=stored.sha256, size_bytes=stored.size_bytes,
            uri=stored.uri, storage_key=stored.key, architecture="LlamaForCausalLM",
            metadata={}, actor="test", request=None)
        s.commit()
        return source.id


def _job(runtime, source_id, targets) -> str:
    with runtime.session() as s:
        job = catalog.create_job(s, source_id=source_id, targets=targets, hardware_class="cpu",
                                 labels={}, actor="test", request=None)
        s.commit()
        return job.id


def _get(runtime, job_id):
    with runtime.session() as s:
        job = catalog.get_job(s, job_id=job_id)
        return job.to_dict()


def _artifact_keys(runtime) -> list[str]:
    return runtime.store.list_keys("artifacts/")


def test_job_runs_to_success_and_records_everything(runtime, source_id):
    job_id = _job(runtime, source_id, [{"format": "gguf", "quantization": "F16", "params": {}}])
    assert run_job(runtime, job_id) == "succeeded"
    job = _get(runtime, job_id)
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert job["attempts"] == 1
    assert len(job["artifact_ids"]) == 1
    assert job["targets"][0]["estimate"]["size_bytes"] > 0
    assert len(_artifact_keys(runtime)) == 1
    assert runtime.store.list_keys("tmp/") == []
    # A second delivery of the same message does nothing: the job is finished.
    assert run_job(runtime, job_id) == "finished"
    assert _get(runtime, job_id)["attempts"] == 1


def test_cancel_while_running_stops_and_leaves_nothing(runtime, source_id):
    targets = [{"format": "gguf", "quantization": q, "params": {}}
               for q in ("F32", "F16", "BF16", "Q8_0")]
    job_id = _job(runtime, source_id, targets)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_job(runtime, job_id)))
    thread.start()
    deadline = time.monotonic() + 60
    while _get(runtime, job_id)["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    with runtime.session() as s:
        catalog.request_cancel(s, job_id=job_id, actor="test", request=None)
        s.commit()
    thread.join(timeout=120)
    assert outcome == ["cancelled"]
    job = _get(runtime, job_id)
    assert job["status"] == "cancelled"
    assert len(job["artifact_ids"]) < len(targets)
    assert len(_artifact_keys(runtime)) == len(job["artifact_ids"])
    assert runtime.store.list_keys("tmp/") == []
    assert list(Path(runtime.scratch_dir).iterdir()) == []


def test_redelivery_after_a_dead_worker_redoes_the_job_once(runtime, source_id):
    job_id = _job(runtime, source_id, [{"format": "gguf", "quantization": "Q8_0", "params": {}}])
    with runtime.session() as s:  # a worker claims it, then dies without a word
        assert catalog.claim_job(s, job_id=job_id, worker_id="dead", lease_s=1,
                                 max_attempts=2).kind == "claimed"
        s.commit()
    assert run_job(runtime, job_id) == "leased"  # its lease is still live
    time.sleep(1.2)
    assert run_job(runtime, job_id) == "succeeded"
    job = _get(runtime, job_id)
    assert job["attempts"] == 2 and job["status"] == "succeeded"


def test_attempts_are_capped(runtime, source_id):
    job_id = _job(runtime, source_id, [{"format": "gguf", "quantization": "Q8_0", "params": {}}])
    for _ in range(2):
        with runtime.session() as s:
            assert catalog.claim_job(s, job_id=job_id, worker_id="dead", lease_s=0,
                                     max_attempts=2).kind == "claimed"
            s.commit()
        time.sleep(0.05)
    assert run_job(runtime, job_id) == "exhausted"
    job = _get(runtime, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "attempts_exhausted"


def test_a_failing_target_fails_the_job_and_cleans_up(runtime, source_id, monkeypatch):
    from quantyard.engine.errors import ValidationFailed

    import quantyard.engine as engine

    real_convert = engine.convert

    def convert_then_fail(source_dir, target, out_dir, **kwargs):
        result = real_convert(source_dir, target, out_dir, **kwargs)
        if target.quantization == "Q8_0":  # as if llama.cpp had disagreed with the source
            raise ValidationFailed("logits drifted: mean KL 0.9 > 0.01")
        return result

    monkeypatch.setattr(engine, "convert", convert_then_fail)
    job_id = _job(runtime, source_id, [{"format": "gguf", "quantization": q, "params": {}}
                                       for q in ("F16", "Q8_0")])
    assert run_job(runtime, job_id) == "failed"
    job = _get(runtime, job_id)
    assert job["error"]["code"] == "validation_failed"
    assert "KL" in job["error"]["message"]
    assert [t["status"] for t in job["targets"]] == ["succeeded", "failed"]
    assert len(_artifact_keys(runtime)) == len(job["artifact_ids"]) == 1
    assert runtime.store.list_keys("tmp/") == []
