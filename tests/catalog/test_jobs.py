"""Jobs on SQLite and Postgres: lifecycle, claims, leases, cancellation, pagination."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from quantyard import catalog
from quantyard.catalog import Job


def test_create_and_get_job(factory, make_job, source):
    job = make_job(targets=[{"format": "gguf", "quantization": "Q8_0", "params": {"pure": True}}, "gguf:Q4_K_M"],
                   labels={"team": "edge", "run": 7})
    with factory() as s:
        got = catalog.get_job(s, job_id=job.id)
        d = got.to_dict()
    assert d["id"].startswith("job_") and d["status"] == "queued" and d["progress"] == 0.0
    assert d["source_id"] == source.id
    assert d["labels"] == {"team": "edge", "run": "7"}
    assert [t["key"] for t in d["targets"]] == ["gguf:Q8_0", "gguf:Q4_K_M"]
    assert d["targets"][0]["params"] == {"pure": True} and d["targets"][0]["status"] == "pending"
    assert d["targets"][0]["id"].startswith("tgt_")
    assert d["artifact_ids"] == [] and d["error"] is None and d["attempts"] == 0
    assert d["created_at"].endswith("Z") and datetime.fromisoformat(d["created_at"]).tzinfo is not None
    assert got.created_at.tzinfo is not None
    with factory() as s:
        assert catalog.get_job(s, job_id="job_missing") is None


def test_create_job_validates(factory, source):
    with factory() as s:
        with pytest.raises(catalog.NotFound):
            catalog.create_job(s, source_id="src_nope", targets=["gguf:Q8_0"], hardware_class="cpu", labels={},
                               actor="a", request=None)
        with pytest.raises(catalog.InvalidArgument):
            catalog.create_job(s, source_id=source.id, targets=[], hardware_class="cpu", labels={}, actor="a",
                               request=None)


def test_lifecycle_success(factory, make_job, source):
    job = make_job(targets=["gguf:Q8_0", "gguf:F16"])
    with factory.begin() as s:
        out = catalog.claim_job(s, job_id=job.id, worker_id="w1", lease_s=60, max_attempts=3)
        assert out.kind == "claimed" and out.claimed and out.attempt == 1
        assert out.job.status == "running" and out.job.worker_id == "w1" and out.job.started_at is not None
    t1, t2 = out.job.targets
    with factory.begin() as s:
        catalog.set_target_status(s, target_id=t1.id, status="running", estimate={"size_bytes": 10})
        assert catalog.set_progress(s, job_id=job.id, progress=0.25, message="converting", target_id=t1.id,
                                    target_progress=0.5) is False
        assert catalog.renew_lease(s, job_id=job.id, worker_id="w1", lease_s=60)
        assert not catalog.renew_lease(s, job_id=job.id, worker_id="other", lease_s=60)
    with factory.begin() as s:
        for t in (t1, t2):
            catalog.record_artifact(
                s, job_id=job.id, target_id=t.id, source_id=source.id, format=t.format,
                quantization=t.quantization, sha256=(t.quantization.lower() * 64)[:64], size_bytes=99,
                uri=f"file:///o/artifacts/{t.id}", storage_key=f"artifacts/{t.id}", filename="m.gguf",
                metrics={"top1_agreement": 1.0}, metadata={"architecture": "llama"}, engine_version="0.1.0",
                recipe={"target": t.key}, recipe_hash="r" * 64,
            )
    with factory.begin() as s:
        done = catalog.finish_job(s, job_id=job.id, status="succeeded")
    d = done.to_dict()
    assert d["status"] == "succeeded" and d["progress"] == 1.0 and d["finished_at"]
    assert len(d["artifact_ids"]) == 2 and all(t["status"] == "succeeded" for t in d["targets"])
    assert {t["artifact_id"] for t in d["targets"]} == set(d["artifact_ids"])
    assert d["targets"][0]["estimate"] == {"size_bytes": 10}
    with factory.begin() as s:  # finishing again is a no-op
        assert catalog.finish_job(s, job_id=job.id, status="failed", error_code="x").status == "succeeded"
        assert catalog.claim_job(s, job_id=job.id, worker_id="w2", lease_s=60, max_attempts=3).kind == "finished"
        assert catalog.claim_job(s, job_id="job_gone", worker_id="w2", lease_s=60, max_attempts=3).kind == "gone"


def test_failure_sets_error_and_targets(factory, make_job):
    job = make_job(targets=["gguf:Q8_0", "gguf:F16"])
    with factory.begin() as s:
        out = catalog.claim_job(s, job_id=job.id, worker_id="w1", lease_s=60, max_attempts=3)
        catalog.set_target_status(s, target_id=out.job.targets[0].id, status="running")
    with factory.begin() as s:
        failed = catalog.finish_job(s, job_id=job.id, status="failed", error_code="validation_failed",
                                    error_message="logits drifted")
    d = failed.to_dict()
    assert d["error"] == {"code": "validation_failed", "message": "logits drifted"}
    # Every unfinished target shows the job's cause (issue 10: a failed prepare stage is not "cancelled").
    assert [t["status"] for t in d["targets"]] == ["failed", "failed"]
    assert [t["error"] for t in d["targets"]] == [{"code": "validation_failed", "message": "logits drifted"}] * 2
    with factory() as s, pytest.raises(catalog.InvalidArgument):
        catalog.finish_job(s, job_id=job.id, status="running")


def _claim_in_thread(factory, job_id, worker_id, barrier, results):
    try:
        with factory() as s:
            barrier.wait(timeout=10)
            out = catalog.claim_job(s, job_id=job_id, worker_id=worker_id, lease_s=300, max_attempts=3)
            s.commit()
            results[worker_id] = out.kind
    except Exception as exc:  # surfaced by the assertion below
        results[worker_id] = repr(exc)


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_claims_only_one_wins(factory, make_job, round_):
    job = make_job()
    barrier = threading.Barrier(4)
    results: dict[str, str] = {}
    threads = [threading.Thread(target=_claim_in_thread, args=(factory, job.id, f"w{i}", barrier, results))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results.values()) == ["claimed", "leased", "leased", "leased"], results
    with factory() as s:
        got = catalog.get_job(s, job_id=job.id)
        assert got.attempts == 1 and got.worker_id == [w for w, k in results.items() if k == "claimed"][0]


def _expire_lease(factory, job_id):
    with factory.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)))


def test_redelivery_after_lease_expiry(factory, make_job):
    job = make_job(targets=["gguf:Q8_0"])
    with factory.begin() as s:
        first = catalog.claim_job(s, job_id=job.id, worker_id="w1", lease_s=300, max_attempts=3)
        catalog.set_target_status(s, target_id=first.job.targets[0].id, status="running")
    with factory.begin() as s:  # lease still valid: a redelivered task must not run it twice
        out = catalog.claim_job(s, job_id=job.id, worker_id="w2", lease_s=300, max_attempts=3)
        assert out.kind == "leased" and 0 < out.retry_after_s <= 300
    _expire_lease(factory, job.id)
    with factory.begin() as s:
        out = catalog.claim_job(s, job_id=job.id, worker_id="w2", lease_s=300, max_attempts=3)
        assert out.kind == "claimed" and out.attempt == 2 and out.job.worker_id == "w2"
        assert out.job.targets[0].status == "pending"
    with factory.begin() as s:  # the old worker lost its lease
        assert not catalog.renew_lease(s, job_id=job.id, worker_id="w1", lease_s=300)


def test_attempts_exhausted_fails_job(factory, make_job):
    job = make_job()
    for attempt in (1, 2):
        with factory.begin() as s:
            assert catalog.claim_job(s, job_id=job.id, worker_id=f"w{attempt}", lease_s=300,
                                     max_attempts=2).kind == "claimed"
        _expire_lease(factory, job.id)
    with factory.begin() as s:
        out = catalog.claim_job(s, job_id=job.id, worker_id="w3", lease_s=300, max_attempts=2)
    assert out.kind == "exhausted"
    d = out.job.to_dict()
    assert d["status"] == "failed" and d["error"]["code"] == "attempts_exhausted" and d["attempts"] == 2
    assert d["finished_at"] is not None
    with factory.begin() as s:
        assert catalog.claim_job(s, job_id=job.id, worker_id="w4", lease_s=300, max_attempts=2).kind == "finished"


def test_cancel_queued_and_running(factory, make_job):
    queued, running = make_job(), make_job()
    with factory.begin() as s:
        catalog.claim_job(s, job_id=running.id, worker_id="w1", lease_s=300, max_attempts=3)
    with factory.begin() as s:
        q = catalog.request_cancel(s, job_id=queued.id, actor="key:alice", request=None)
        r = catalog.request_cancel(s, job_id=running.id, actor="key:alice", request=None)
        assert q.status == "cancelled" and q.finished_at is not None
        assert q.to_dict()["targets"][0]["status"] == "cancelled"
        assert r.status == "running" and r.cancel_requested
    with factory.begin() as s:
        assert catalog.claim_job(s, job_id=queued.id, worker_id="w2", lease_s=300, max_attempts=3).kind == "cancelled"
        assert catalog.set_progress(s, job_id=running.id, progress=0.5, message="x") is True
        done = catalog.finish_job(s, job_id=running.id, status="cancelled")
        assert done.status == "cancelled"
        again = catalog.request_cancel(s, job_id=running.id, actor="key:alice", request=None)
        assert again.status == "cancelled"
    with factory() as s, pytest.raises(catalog.NotFound):
        catalog.request_cancel(s, job_id="job_nope", actor="a", request=None)


def test_cancel_requested_then_worker_died(factory, make_job):
    job = make_job()
    with factory.begin() as s:
        catalog.claim_job(s, job_id=job.id, worker_id="w1", lease_s=300, max_attempts=3)
        catalog.request_cancel(s, job_id=job.id, actor="key:a", request=None)
    _expire_lease(factory, job.id)
    with factory.begin() as s:
        out = catalog.claim_job(s, job_id=job.id, worker_id="w2", lease_s=300, max_attempts=3)
        assert out.kind == "cancelled" and out.job.status == "cancelled"


def test_progress_is_clamped(factory, make_job):
    job = make_job()
    with factory.begin() as s:
        catalog.set_progress(s, job_id=job.id, progress=1.7, message="over")
    with factory() as s:
        assert catalog.get_job(s, job_id=job.id).progress == 1.0
        with pytest.raises(catalog.NotFound):
            catalog.set_progress(s, job_id="job_nope", progress=0.1)
        with pytest.raises(catalog.InvalidArgument):
            catalog.set_target_status(s, target_id=job.targets[0].id, status="exploded")


def test_list_jobs_pagination_is_stable(factory, make_job):
    ids = [make_job(labels={"team": "a" if i % 2 else "b"}).id for i in range(7)]
    # Two jobs with the same created_at: the id breaks the tie.
    same = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    with factory.begin() as s:
        s.execute(update(Job).where(Job.id.in_(ids[:2])).values(created_at=same))
    seen, cursor, pages = [], None, 0
    while True:
        with factory() as s:
            page, cursor = catalog.list_jobs(s, limit=3, cursor=cursor)
        seen += [j.id for j in page]
        pages += 1
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen)) and pages == 3
    assert seen[:2] == sorted(ids[:2], reverse=True)
    # A job created while paging does not shift later pages.
    with factory() as s:
        first, cursor = catalog.list_jobs(s, limit=4)
    make_job()
    with factory() as s:
        rest, _ = catalog.list_jobs(s, limit=10, cursor=cursor)
    assert [j.id for j in first] + [j.id for j in rest] == seen
    with factory() as s:
        team_a, _ = catalog.list_jobs(s, label="team=a")
        assert {j.id for j in team_a} == {ids[i] for i in range(7) if i % 2}
        assert catalog.list_jobs(s, status="running")[0] == []
        assert len(catalog.list_jobs(s, status=["queued"], limit=100)[0]) == 8
        with pytest.raises(catalog.InvalidCursor):
            catalog.list_jobs(s, cursor="garbage!")
        with pytest.raises(catalog.InvalidArgument):
            catalog.list_jobs(s, status="bogus")
        with pytest.raises(catalog.InvalidArgument):
            catalog.list_jobs(s, label="novalue")


def test_queue_depth_and_workers(factory, make_job):
    make_job(hardware_class="cpu")
    make_job(hardware_class="cpu")
    running = make_job(hardware_class="cuda")
    make_job(hardware_class="cuda")
    with factory.begin() as s:
        catalog.claim_job(s, job_id=running.id, worker_id="w", lease_s=60, max_attempts=3)
        assert catalog.queue_depth(s) == {"cpu": 2, "cuda": 1}
        catalog.worker_heartbeat(s, worker_id="w1", hostname="h1", hardware_class="cpu", capabilities={"avx2": True})
        catalog.worker_heartbeat(s, worker_id="w2", hostname="h2", hardware_class="cuda", capabilities={})
        catalog.worker_heartbeat(s, worker_id="w1", hostname="h1", hardware_class="cpu", capabilities={"avx512": True})
    with factory.begin() as s:
        s.execute(update(catalog.Worker).where(catalog.Worker.id == "w2").values(
            last_heartbeat_at=datetime.now(UTC) - timedelta(minutes=5)))
    with factory() as s:
        live = catalog.live_workers(s, stale_after_s=60)
        assert [w.id for w in live] == ["w1"] and live[0].capabilities == {"avx512": True}
        assert catalog.live_workers(s, hardware_class="cuda", stale_after_s=60) == []
        assert len(catalog.live_workers(s, stale_after_s=3600)) == 2
        assert live[0].to_dict()["last_heartbeat_at"].endswith("Z")
