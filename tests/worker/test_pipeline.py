"""The worker pipelines in-process on a real SQLite catalog and local object store (no Celery):
shared work once, targets as their own tasks, claim semantics, cancellation, redelivery after a
crash, cleanup on failure."""

from __future__ import annotations

import hashlib
import tarfile
import threading
import time
from pathlib import Path

import pytest

from quantyard import catalog
from quantyard.engine.stages import eval_reference_filename
from quantyard.settings import Settings
from worker.pipeline import run_job
from worker.runtime import build_runtime
from worker.target_pipeline import run_target


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


def _job(runtime, source_id, quants) -> str:
    with runtime.session() as s:
        job = catalog.create_job(
            s, source_id=source_id, hardware_class="cpu", labels={}, actor="test", request=None,
            targets=[{"format": "gguf", "quantization": q, "params": {}} for q in quants])
        s.commit()
        return job.id


def _get(runtime, job_id) -> dict:
    with runtime.session() as s:
        return catalog.get_job(s, job_id=job_id).to_dict()


def _run(runtime, job_id) -> tuple[str, list[str]]:
    """The prepare task, then each dispatched target task, in this process."""
    dispatched: list[tuple] = []
    outcome = run_job(runtime, job_id, lambda *args: dispatched.append(args))
    targets = [run_target(runtime, *args) for args in dispatched]
    return outcome, targets


def _objects(runtime) -> list[str]:
    return runtime.store.list_keys("artifacts/")


def test_targets_are_made_from_one_intermediate(runtime, source_id):
    """The plan: the F16 comes out of the prepare task's one read of the source (with the
    intermediate), straight from the source as convert_hf_to_gguf.py makes it; the Q8_0 is
    quantized from the intermediate in a task of its own, against the reference outputs stored
    beside the intermediate."""
    job_id = _job(runtime, source_id, ["F16", "Q8_0"])
    outcome, targets = _run(runtime, job_id)
    assert (outcome, targets) == ("dispatched", ["succeeded"])  # only the Q8_0 needed a task
    job = _get(runtime, job_id)
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert [t["status"] for t in job["targets"]] == ["succeeded", "succeeded"]
    assert all(t["estimate"]["size_bytes"] > 0 for t in job["targets"])
    assert len(job["artifact_ids"]) == 2 and len(job["intermediate_artifact_ids"]) == 1
    # intermediate + its reference outputs, its evaluation reference and the source's files but
    # its weights, F16, Q8_0
    assert len(_objects(runtime)) == 6 and runtime.store.list_keys("tmp/") == []

    (intermediate,) = job["intermediate_artifact_ids"]
    with runtime.session() as s:
        inter = catalog.get_artifact(s, artifact_id=intermediate).to_dict()
        assert inter["quantization"] == "F32"
        evaluation = eval_reference_filename(None, runtime.settings.evaluation_chunks or None)
        assert [c["name"] for c in inter["metadata"]["companion_files"]] == ["reference.safetensors",
                                                                            "source-meta.tar", evaluation]
        f16_id, q8_id = job["artifact_ids"]
        f16_up = catalog.lineage(s, artifact_id=f16_id)["upstream"]
        assert [(n["type"], n["id"]) for n in f16_up] == [("source", source_id)]
        q8_up = catalog.lineage(s, artifact_id=q8_id)["upstream"]
        assert [(n["type"], n["id"]) for n in q8_up][:1] == [("artifact", intermediate)]
        assert q8_up[-1]["type"] == "source" and q8_up[-1]["id"] == source_id

    # A redelivered prepare message does nothing to a finished job.
    assert run_job(runtime, job_id, lambda *a: pytest.fail("dispatched twice")) == "finished"


def test_target_equal_to_the_intermediate_reuses_it_and_jobs_share_it(runtime, source_id):
    first = _job(runtime, source_id, ["F32"])
    assert _run(runtime, first) == ("succeeded", [])
    job = _get(runtime, first)
    assert job["status"] == "succeeded" and len(job["artifact_ids"]) == 1
    assert job["intermediate_artifact_ids"] == []  # the intermediate *is* the F32 artifact

    second = _job(runtime, source_id, ["F32", "Q8_0"])
    assert _run(runtime, second) == ("dispatched", ["succeeded"])
    again = _get(runtime, second)
    assert again["artifact_ids"][0] == job["artifact_ids"][0]  # reused by recipe hash
    assert len(_objects(runtime)) == 5  # the F32 once (reference outputs, evaluation reference, source files), the Q8_0


def test_cancel_while_running_stops_and_leaves_nothing(runtime, source_id):
    job_id = _job(runtime, source_id, ["F16", "BF16", "Q8_0"])
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_run(runtime, job_id)))
    thread.start()
    deadline = time.monotonic() + 60
    while _get(runtime, job_id)["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    with runtime.session() as s:
        catalog.request_cancel(s, job_id=job_id, actor="test", request=None)
        s.commit()
    thread.join(timeout=120)
    job = _get(runtime, job_id)
    assert job["status"] == "cancelled", (outcome, job)
    assert all(t["status"] in ("cancelled", "succeeded") for t in job["targets"])
    assert len(job["artifact_ids"]) < 3
    stored = len(_objects(runtime))
    assert stored == len(job["artifact_ids"]) + len(job["intermediate_artifact_ids"])
    assert runtime.store.list_keys("tmp/") == []
    assert list(Path(runtime.scratch_dir).iterdir()) == []


def test_redelivery_after_a_dead_worker_redoes_the_job_once(runtime, source_id):
    job_id = _job(runtime, source_id, ["Q8_0"])
    with runtime.session() as s:  # a worker claims it, then dies without a word
        assert catalog.claim_job(s, job_id=job_id, worker_id="dead", lease_s=1,
                                 max_attempts=2).kind == "claimed"
        s.commit()
    assert run_job(runtime, job_id, lambda *a: None) == "leased"  # its lease is still live
    time.sleep(1.2)
    assert _run(runtime, job_id) == ("dispatched", ["succeeded"])
    job = _get(runtime, job_id)
    assert job["attempts"] == 2 and job["status"] == "succeeded"


def test_a_target_whose_worker_died_is_redone_once(runtime, source_id):
    job_id = _job(runtime, source_id, ["Q8_0"])
    dispatched: list = []
    assert run_job(runtime, job_id, lambda *a: dispatched.append(a)) == "dispatched"
    (_, target_id, inputs), = dispatched
    # A redelivered prepare message does nothing while targets are under way.
    assert run_job(runtime, job_id, lambda *a: pytest.fail("dispatched twice")) == "dispatched"
    with runtime.session() as s:
        assert catalog.claim_target(s, target_id=target_id, worker_id="dead", lease_s=1,
                                    max_attempts=2).kind == "claimed"
        s.commit()
    assert run_target(runtime, job_id, target_id, inputs) == "leased"
    time.sleep(1.2)
    assert run_target(runtime, job_id, target_id, inputs) == "succeeded"
    assert run_target(runtime, job_id, target_id, inputs) == "finished"  # a third delivery
    job = _get(runtime, job_id)
    assert job["status"] == "succeeded" and job["targets"][0]["attempts"] == 2


def test_attempts_are_capped(runtime, source_id):
    job_id = _job(runtime, source_id, ["Q8_0"])
    for _ in range(2):
        with runtime.session() as s:
            assert catalog.claim_job(s, job_id=job_id, worker_id="dead", lease_s=0,
                                     max_attempts=2).kind == "claimed"
            s.commit()
        time.sleep(0.05)
    assert run_job(runtime, job_id, lambda *a: None) == "exhausted"
    job = _get(runtime, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "attempts_exhausted"


def test_a_failing_target_fails_the_job_and_cleans_up(runtime, source_id, monkeypatch):
    import quantyard.engine.stages as stages
    from quantyard.engine.errors import ValidationFailed

    real_quantize = stages.quantize

    def quantize_then_fail(input_gguf, target, out_dir, **kwargs):
        result = real_quantize(input_gguf, target, out_dir, **kwargs)
        if target.quantization == "Q8_0":  # as if llama.cpp had disagreed with the source
            raise ValidationFailed("logits drifted: mean KL 0.9 > 0.01")
        return result

    monkeypatch.setattr(stages, "quantize", quantize_then_fail)
    job_id = _job(runtime, source_id, ["F16", "Q8_0"])
    assert _run(runtime, job_id) == ("dispatched", ["failed"])  # the F16 was made in the prepare task
    job = _get(runtime, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "validation_failed" and "KL" in job["error"]["message"]
    assert [t["status"] for t in job["targets"]] == ["succeeded", "failed"]
    assert len(_objects(runtime)) == 5  # the intermediate (+ 3 companions) and the F16, nothing of the Q8_0
    assert runtime.store.list_keys("tmp/") == []


def test_imatrix_targets_share_one_imatrix_recorded_in_lineage(runtime, source_id):
    job_id = _job(runtime, source_id, ["Q4_K_M", "IQ2_XS"])
    assert _run(runtime, job_id) == ("dispatched", ["succeeded", "succeeded"])
    job = _get(runtime, job_id)
    assert job["status"] == "succeeded"
    with runtime.session() as s:
        extra = [catalog.get_artifact(s, artifact_id=i).to_dict()
                 for i in job["intermediate_artifact_ids"]]
        (imatrix,) = [a for a in extra if a["format"] == "imatrix"]
        q4, iq2 = (catalog.get_artifact(s, artifact_id=i).to_dict() for i in job["artifact_ids"])
        assert q4["metadata"]["imatrix"] is None  # Q4_K_M did not ask for one
        assert iq2["metadata"]["imatrix"]["sha256"] == imatrix["sha256"]
        assert iq2["metadata"]["imatrix"]["chunks_count"] >= 1
        parents = {n["id"] for n in catalog.lineage(s, artifact_id=iq2["id"])["upstream"]
                   if n["depth"] == 1}
        assert imatrix["id"] in parents
    assert 1.5 < iq2["metrics"]["bits_per_weight"] < q4["metrics"]["bits_per_weight"] < 6


def test_a_quantized_gguf_source_is_requantized_with_a_warning(runtime, tiny_llama_dir,
                                                             tmp_path):
    from quantyard import engine
    from quantyard.engine.spec import parse_target

    q8 = engine.convert(tiny_llama_dir, parse_target("gguf:Q8_0"), tmp_path / "q8")
    stored = runtime.store.put_file("sources/q8/source.gguf", q8.path)
    with runtime.session() as s:
        source = catalog.create_source(
            s, name="tiny-q8", sha256=stored.sha256, size_bytes=stored.size_bytes,
            uri=stored.uri, storage_key=stored.key, architecture="llama",
            metadata={"format": "gguf", "file_type": "Q8_0", "quantized": True},
            actor="test", request=None)
        s.commit()
        gguf_source = source.id
    job_id = _job(runtime, gguf_source, ["Q4_K_M"])
    assert _run(runtime, job_id) == ("dispatched", ["succeeded"])
    job = _get(runtime, job_id)
    assert job["status"] == "succeeded"
    assert [w["code"] for w in job["warnings"]] == ["requantized"]
    assert job["targets"][0]["estimate"]["size_bytes"] > 0
    with runtime.session() as s:
        artifact = catalog.get_artifact(s, artifact_id=job["artifact_ids"][0]).to_dict()
    assert artifact["metadata"]["requantized_from"] == "Q8_0"
    assert artifact["metrics"]["reference"] == "input-gguf"


def test_a_split_gguf_target_is_published_with_all_its_shards(runtime, source_id, tiny_llama_dir, tmp_path):
    """params.split_max_size writes llama.cpp split shards; every shard is stored beside the
    first, listed as a companion file, and fetched back with it; llama.cpp loads the set."""
    from tests import oracles
    from worker.sources import fetch_artifact

    with runtime.session() as s:
        job = catalog.create_job(
            s, source_id=source_id, hardware_class="cpu", labels={}, actor="test", request=None,
            targets=[{"format": "gguf", "quantization": "F32", "params": {"split_max_size": "2M"}}])
        s.commit()
        job_id = job.id
    assert _run(runtime, job_id) == ("dispatched", ["succeeded"])
    job = _get(runtime, job_id)
    with runtime.session() as s:
        art = catalog.get_artifact(s, artifact_id=job["artifact_ids"][0]).to_dict()
    companions = art["metadata"]["companion_files"]
    assert art["filename"].endswith(f"-00001-of-{len(companions) + 1:05d}.gguf") and len(companions) >= 2
    keys = set(runtime.store.list_keys(f"artifacts/{job_id}/"))
    assert {art["storage_key"], *(c["key"] for c in companions)} <= keys
    assert art["metadata"]["total_size_bytes"] == art["size_bytes"] + sum(c["size_bytes"] for c in companions)

    first = fetch_artifact(runtime, art, tmp_path)
    for c in companions:
        assert hashlib.sha256((tmp_path / c["name"]).read_bytes()).hexdigest() == c["sha256"]
    result = oracles.compare(tiny_llama_dir, first)  # llama.cpp opens the whole set from shard 1
    assert result.llama_ids == result.hf_ids and result.top1_agreement == 1.0
    assert result.max_abs_diff < 1e-2


def test_a_bad_split_size_is_refused_with_the_target(runtime):
    from quantyard.engine.errors import UnsupportedTarget
    from quantyard.engine.spec import parse_target

    for bad in ("2 gigs", "10K", True):
        with pytest.raises(UnsupportedTarget, match="size"):
            parse_target({"format": "gguf", "quantization": "Q8_0", "params": {"split_max_size": bad}})
    assert parse_target({"format": "gguf", "quantization": "Q8_0",
                         "params": {"split_max_size": "1.5G"}}).params["split_max_size"] == "1.5G"


def test_an_onnx_target_with_external_data_ships_both_files(runtime, tmp_path):
    """params.external_data: the graph and `<name>.onnx.data` are validated as they ship,
    stored side by side, fetched back together; onnxruntime loads the pair and matches
    transformers on the source."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tests.fixtures.onnx_encoders import encoder_model
    from worker.sources import fetch_artifact

    model_dir = encoder_model("BertModel")
    archive = tmp_path / "bert.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_dir, arcname="tiny-bert")
    stored = runtime.store.put_file("sources/bert/source.tar.gz", archive)
    with runtime.session() as s:
        source = catalog.create_source(
            s, name="tiny-bert", sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri,
            storage_key=stored.key, architecture="BertModel", metadata={}, actor="test", request=None)
        job = catalog.create_job(
            s, source_id=source.id, hardware_class="cpu", labels={}, actor="test", request=None,
            targets=[{"format": "onnx", "quantization": "fp32", "params": {"external_data": True}}])
        s.commit()
        job_id = job.id
    assert _run(runtime, job_id) == ("dispatched", ["succeeded"])
    with runtime.session() as s:
        art = catalog.get_artifact(s, artifact_id=_get(runtime, job_id)["artifact_ids"][0]).to_dict()
    (companion,) = art["metadata"]["companion_files"]
    assert companion["name"] == art["filename"] + ".data" and companion["size_bytes"] > art["size_bytes"]

    fetched = tmp_path / "fetched"
    fetched.mkdir()
    path = fetch_artifact(runtime, art, fetched)
    assert hashlib.sha256((fetched / companion["name"]).read_bytes()).hexdigest() == companion["sha256"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(["external data works", "a second, longer sentence to pad against"], padding=True,
              return_tensors="np")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    out = sess.run(None, feeds)[0]
    with torch.no_grad():
        ref = AutoModel.from_pretrained(model_dir).eval()(
            **{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    mask = enc["attention_mask"].astype(bool)
    assert float(np.abs(out[mask] - ref[mask]).max()) < 1e-4
