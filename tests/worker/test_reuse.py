"""Reuse by recipe hash, through the real pipelines in-process (SQLite catalog, local store):
an identical job completes without fetching or converting, a mixed job converts only what is
new, a deleted artifact or one whose bytes are gone is never reused, and identical jobs racing
each other convert once."""

from __future__ import annotations

from quantyard import catalog
from tests.worker.test_pipeline import _get, _job, _objects, _run, runtime, source_id  # noqa: F401
from worker.pipeline import run_job
from worker.target_pipeline import run_target


def _reuse_events(rt, job_id):
    with rt.session() as s:
        return [e.details for e in catalog.audit_events(s, resource_type="artifact", limit=1000)
                if e.action == "artifact.reuse" and e.details["job_id"] == job_id]


def test_the_same_job_again_completes_without_converting(runtime, source_id):  # noqa: F811
    first = _job(runtime, source_id, ["Q8_0"])
    assert _run(runtime, first) == ("dispatched", ["succeeded"])
    made = _get(runtime, first)
    before = sorted(_objects(runtime))

    second = _job(runtime, source_id, ["Q8_0"])
    assert _run(runtime, second) == ("succeeded", [])  # nothing dispatched
    job = _get(runtime, second)
    assert sorted(_objects(runtime)) == before  # no new object in the store
    (target,) = job["targets"]
    assert target["status"] == "succeeded" and target["reused"] is True
    assert target["reused_from_job"] == first and target["artifact_id"] == made["artifact_ids"][0]
    assert target["estimate"] is None  # preflight never ran: the source was not even fetched
    assert job["status"] == "succeeded" and job["reused_artifact_ids"] == made["artifact_ids"]
    assert job["intermediate_artifact_ids"] == []
    (event,) = _reuse_events(runtime, second)
    assert event["target_id"] == target["id"] and event["reused_from_job"] == first
    assert made["targets"][0]["reused"] is False
    with runtime.session() as s:
        assert catalog.verify_audit_chain(s).ok


def test_a_job_with_one_new_target_converts_only_that_one(runtime, source_id):  # noqa: F811
    first = _job(runtime, source_id, ["Q8_0"])
    _run(runtime, first)
    before = set(_objects(runtime))

    second = _job(runtime, source_id, ["Q8_0", "Q4_0"])
    assert _run(runtime, second) == ("dispatched", ["succeeded"])  # only Q4_0 ran
    job = _get(runtime, second)
    q8, q4 = job["targets"]
    assert (q8["reused"], q4["reused"]) == (True, False)
    assert q8["artifact_id"] == _get(runtime, first)["artifact_ids"][0]
    new = set(_objects(runtime)) - before
    assert len(new) == 1 and q4["id"] in next(iter(new))  # the Q4_0, made from the reused intermediate
    assert [e["target_id"] for e in _reuse_events(runtime, second)] == [q8["id"]]


def test_deleted_or_missing_artifacts_are_not_reused(runtime, source_id):  # noqa: F811
    first = _job(runtime, source_id, ["Q8_0", "Q4_0"])
    _run(runtime, first)
    q8_id, q4_id = _get(runtime, first)["artifact_ids"]
    with runtime.session() as s:
        catalog.delete_artifact(s, artifact_id=q8_id, actor="test")
        q4_key = catalog.get_artifact(s, artifact_id=q4_id).storage_key
        s.commit()
    runtime.store.delete(q4_key)  # bytes lost behind the catalog's back

    second = _job(runtime, source_id, ["Q8_0", "Q4_0"])
    assert _run(runtime, second) == ("dispatched", ["succeeded", "succeeded"])
    job = _get(runtime, second)
    assert [t["reused"] for t in job["targets"]] == [False, False]
    assert not set(job["artifact_ids"]) & {q8_id, q4_id}
    assert _reuse_events(runtime, second) == []


def test_identical_jobs_prepared_together_convert_once(runtime, source_id):  # noqa: F811
    jobs = [_job(runtime, source_id, ["Q8_0"]) for _ in range(2)]
    dispatched: list[tuple] = []
    for job_id in jobs:  # both prepared before either target runs: nothing to reuse yet
        assert run_job(runtime, job_id, lambda *args: dispatched.append(args)) == "dispatched"
    assert [run_target(runtime, *args) for args in dispatched] == ["succeeded", "succeeded"]
    a, b = (_get(runtime, j) for j in jobs)
    assert a["artifact_ids"] == b["artifact_ids"]
    assert (a["targets"][0]["reused"], b["targets"][0]["reused"]) == (False, True)
    assert len(_objects(runtime)) == 5  # the shared intermediate (+ its 3 companions) and one Q8_0


def test_a_mixed_gguf_and_onnx_job_is_reused_whole(runtime, source_id):  # noqa: F811
    """ONNX targets are converted from the source even beside GGUF targets (their recipe names
    no intermediate), so a second identical job reuses both without any work."""
    targets = [{"format": "gguf", "quantization": "Q8_0", "params": {}},
               {"format": "onnx", "quantization": "fp32", "params": {}}]

    def submit():
        with runtime.session() as s:
            job = catalog.create_job(s, source_id=source_id, hardware_class="cpu", labels={}, actor="test",
                                     request=None, targets=targets)
            s.commit()
            return job.id

    first = submit()
    assert _run(runtime, first) == ("dispatched", ["succeeded", "succeeded"]), _get(runtime, first)
    before = sorted(_objects(runtime))
    second = submit()
    assert _run(runtime, second) == ("succeeded", [])
    job = _get(runtime, second)
    assert [t["reused"] for t in job["targets"]] == [True, True]
    assert job["artifact_ids"] == _get(runtime, first)["artifact_ids"]
    assert sorted(_objects(runtime)) == before
