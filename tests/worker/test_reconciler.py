"""The reconciler at catalog level, on SQLite and Postgres, with a real Redis of its own
(``redis-server`` without persistence on a free port) as the broker it re-sends to: lost
messages are re-sent once by one leader, never while a message waits or every worker is busy;
expired leases are re-sent and re-claimed; cancel ends a job nobody runs; a cancel during the
upload wins; a failed prepare stage shows its targets failed with the cause; a worker that cannot
reach the catalog keeps its message."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from quantyard import catalog
from quantyard.catalog import reconcile
from quantyard.engine.errors import Cancelled
from quantyard.engine.results import ConversionResult
from quantyard.queue import make_celery, queue_name, waiting_message_ids
from quantyard.settings import Settings
from tests.fixtures.services import service_unavailable
from worker.outage import CatalogUnavailable, is_catalog_outage, wait_for_catalog
from worker.pipeline import run_job
from worker.publish import publish
from worker.reconciler import Reconciler, reconcile_once
from worker.runtime import build_runtime

GRACE_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test's own (never the machine's shared one), without persistence."""
    if shutil.which("redis-server") is None:
        service_unavailable("redis-server", "binary not found")
    import redis

    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=5)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0", client
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
def settings(catalog_url, redis_server, tmp_path):
    return Settings(database_url=catalog_url, broker_url=redis_server[0], data_dir=tmp_path / "data",
                    reconcile_grace_s=GRACE_S, worker_stale_after_s=60, job_lease_s=60, catalog_wait_s=1)


@pytest.fixture
def rt(settings):
    runtime = build_runtime(settings, worker_id="reconciler-test")
    yield runtime
    runtime.sessions.kw["bind"].dispose()


@pytest.fixture
def app(settings):
    return make_celery(settings)


@pytest.fixture
def redis_client(redis_server):
    return redis_server[1]


@pytest.fixture
def source_id(rt):
    with rt.session() as s:
        source = catalog.create_source(s, name="tiny", sha256="b" * 64, size_bytes=10, uri="file:///x",
                                       storage_key="sources/x", architecture="LlamaForCausalLM", metadata={},
                                       actor="test")
        s.commit()
        return source.id


def _job(rt, source_id, targets=("gguf:Q8_0",), *, age_s: float = 0.0) -> str:
    with rt.session() as s:
        job = catalog.create_job(s, source_id=source_id, targets=list(targets), actor="test")
        s.flush()
        if age_s:
            s.execute(update(catalog.Job).where(catalog.Job.id == job.id)
                      .values(created_at=catalog.models.utcnow() - timedelta(seconds=age_s)))
        s.commit()
        return job.id


def _worker(rt, worker_id="w1", concurrency=1):
    with rt.session() as s:
        catalog.worker_heartbeat(s, worker_id=worker_id, hostname="h", hardware_class="cpu",
                                 capabilities={"concurrency": concurrency})
        s.commit()


def _get(rt, job_id) -> dict:
    with rt.session() as s:
        return catalog.get_job(s, job_id=job_id).to_dict()


def _queued_messages(redis_client) -> list[tuple[str, list]]:
    """(task name, args) of every message in the cpu queue, read straight from Redis."""
    out = []
    for raw in redis_client.lrange(queue_name("cpu"), 0, -1):
        message = json.loads(raw)
        out.append((message["headers"]["task"], json.loads(base64.b64decode(message["body"]))[0]))
    return out


def _resend_events(rt, job_id) -> list[dict]:
    with rt.session() as s:
        return [e.details for e in catalog.audit_events(s, resource_type="job", resource_id=job_id)
                if e.action == reconcile.RESEND_ACTION]


def _expire(rt, *, job_id=None, target_id=None, ago_s=5.0):
    model, key = (catalog.JobTarget, target_id) if target_id else (catalog.Job, job_id)
    with rt.session() as s:
        s.execute(update(model).where(model.id == key)
                  .values(lease_expires_at=catalog.models.utcnow() - timedelta(seconds=ago_s)))
        s.commit()


def _claim(rt, job_id, worker_id="dead-worker", max_attempts=3):
    with rt.session() as s:
        out = catalog.claim_job(s, job_id=job_id, worker_id=worker_id, lease_s=60, max_attempts=max_attempts)
        s.commit()
        return out


def test_lost_queued_job_is_resent_once(rt, app, redis_client, source_id):
    _worker(rt)
    lost = _job(rt, source_id, age_s=GRACE_S + 10)
    fresh = _job(rt, source_id)  # inside the grace period: its message may still be on its way
    sent = reconcile_once(rt, app)
    assert [(r.kind, r.job_id) for r in sent] == [("queued_job", lost)]
    assert _queued_messages(redis_client) == [("quantyard.convert_job", [lost])]
    assert waiting_message_ids(app, ["cpu"]) == {lost}
    assert reconcile_once(rt, app) == []  # just re-sent
    later = catalog.models.utcnow() + timedelta(seconds=GRACE_S + 1)
    # A grace period on, the fresh job (never sent: made here without a message) is lost too;
    # the other is not re-sent again: its message waits in the queue.
    assert [r.job_id for r in reconcile_once(rt, app, now=later)] == [fresh]

    redis_client.flushdb()  # both lost again
    assert [r.job_id for r in reconcile_once(rt, app, now=later)] == [lost, fresh]

    events = _resend_events(rt, lost)
    assert [e["kind"] for e in events] == ["queued_job", "queued_job"] and events[0]["target_id"] is None
    with rt.session() as s:
        assert reconcile.resend_counts(s) == {"queued_job": 4, "expired_job": 0, "pending_target": 0,
                                              "expired_target": 0}
    from prometheus_client import generate_latest

    from api.metrics import make_registry

    text = generate_latest(make_registry(rt.sessions, rt.settings)).decode()
    assert 'quantyard_reconciler_resends_total{kind="queued_job"} 4.0' in text
    assert 'quantyard_reconciler_resends_total{kind="expired_job"} 0.0' in text


def test_nothing_resent_while_every_worker_is_busy_or_none_lives(rt, app, redis_client, source_id):
    lost = _job(rt, source_id, age_s=GRACE_S + 10)
    assert reconcile_once(rt, app) == []  # no live worker: its message would wait anyway
    _worker(rt, concurrency=1)
    busy = _job(rt, source_id)
    assert _claim(rt, busy, worker_id="w1").kind == "claimed"  # the one slot, under a live lease
    assert reconcile_once(rt, app) == []
    with rt.session() as s:
        assert reconcile.slots(s, hardware_class="cpu", stale_after_s=60) == reconcile.Slots(1, 1, 1)
    _expire(rt, job_id=busy)  # its worker died: nobody is busy, both go out again
    with rt.session() as s:
        assert reconcile.slots(s, hardware_class="cpu", stale_after_s=60).busy == 0
    sent = {(r.kind, r.job_id) for r in reconcile_once(rt, app)}
    assert sent == {("queued_job", lost), ("expired_job", busy)}


def test_two_reconcilers_at_once_only_one_acts(rt, app, settings, source_id):
    _worker(rt)
    lost = _job(rt, source_id, age_s=GRACE_S + 10)
    other = build_runtime(settings, worker_id="reconciler-other")  # its own engine and connections
    try:
        with reconcile.leader_lock(other.sessions.kw["bind"]) as held:
            assert held
            assert reconcile_once(rt, app) is None  # the other one leads: this one does nothing
        barrier = threading.Barrier(2)
        results = []

        def run(runtime):
            barrier.wait()
            results.append(reconcile_once(runtime, app))

        threads = [threading.Thread(target=run, args=(r,)) for r in (rt, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # Either both ran at once (one got the lock) or one after the other (the second found
        # the message waiting): one re-send in all.
        assert sum(len(r or []) for r in results) == 1, results
        assert [e["kind"] for e in _resend_events(rt, lost)] == ["queued_job"]
    finally:
        other.sessions.kw["bind"].dispose()


def test_expired_lease_job_is_resent_and_claimed_by_another_worker(rt, app, redis_client, source_id):
    job_id = _job(rt, source_id)
    assert _claim(rt, job_id).kind == "claimed"
    assert reconcile_once(rt, app) == []  # a live lease: its worker is on it
    _expire(rt, job_id=job_id)
    assert reconcile_once(rt, app, expired=False) == []  # right after an outage: leases wait a pass
    sent = reconcile_once(rt, app)
    assert [(r.kind, r.job_id) for r in sent] == [("expired_job", job_id)]
    assert "dead-worker" in sent[0].reason
    assert _queued_messages(redis_client) == [("quantyard.convert_job", [job_id])]
    assert reconcile_once(rt, app) == []  # the new message waits in the queue
    again = _claim(rt, job_id, worker_id="healthy-worker")
    assert (again.kind, again.attempt) == ("claimed", 2)


def _tasks(source_sha256: str, target_ids: list[str], quants: tuple[str, ...]) -> dict:
    """A dispatch record as the prepare task writes it: each target's step of the job's plan."""
    from quantyard.engine.plan import TargetTask, plan_conversion

    plan = plan_conversion(source_sha256=source_sha256, targets=[f"gguf:{q}" for q in quants])
    return {"tasks": {tid: TargetTask(step=plan.step(step_id), source_sha256=source_sha256,
                                      engine_version=plan.engine_version, source_format="hf",
                                      artifacts={i: "art_x" for i in plan.step(step_id).inputs}).to_dict()
                      for tid, step_id in zip(target_ids, plan.targets, strict=True)}}


def test_lost_targets_are_resent_with_their_inputs(rt, app, redis_client, source_id):
    _worker(rt, concurrency=2)
    job_id = _job(rt, source_id, targets=("gguf:Q8_0", "gguf:Q4_K_M", "gguf:F16"))
    assert _claim(rt, job_id).kind == "claimed"
    with rt.session() as s:
        job = catalog.get_job(s, job_id=job_id)
        first, second, third = [t.id for t in job.targets]
        sha = catalog.get_source(s, source_id=source_id).sha256
        inputs = _tasks(sha, [first, second, third], ("Q8_0", "Q4_K_M", "F16"))
        catalog.mark_dispatched(s, job_id=job_id, message="3 target(s) dispatched", inputs=inputs)
        s.execute(update(catalog.Job).where(catalog.Job.id == job_id)
                  .values(dispatched_at=catalog.models.utcnow() - timedelta(seconds=GRACE_S + 5)))
        s.commit()
    with rt.session() as s:
        assert catalog.claim_target(s, target_id=first, worker_id="w1", lease_s=60, max_attempts=3).claimed
        assert catalog.claim_target(s, target_id=second, worker_id="dead", lease_s=60, max_attempts=3).claimed
        s.commit()
    _expire(rt, target_id=second)
    sent = sorted((r.kind, r.target_id) for r in reconcile_once(rt, app))
    assert sent == [("expired_target", second), ("pending_target", third)]
    messages = sorted(_queued_messages(redis_client), key=lambda m: m[1][1])
    tasks = inputs["tasks"]  # each target gets its own step, as recorded
    assert messages == sorted([("quantyard.convert_target", [job_id, second, tasks[second]]),
                               ("quantyard.convert_target", [job_id, third, tasks[third]])], key=lambda m: m[1][1])
    assert {e["target_id"] for e in _resend_events(rt, job_id)} == {second, third}
    assert waiting_message_ids(app, ["cpu"]) == {second, third}


def test_a_target_without_a_valid_recorded_step_is_failed_not_resent_forever(rt, app, redis_client, source_id):
    """A dispatch record from before the plan (free-form inputs), or a damaged one, cannot make
    a message the task would accept: the target fails saying why, once, and its job settles."""
    _worker(rt, concurrency=2)
    job_id = _job(rt, source_id, targets=("gguf:Q8_0",))
    assert _claim(rt, job_id).kind == "claimed"
    with rt.session() as s:
        catalog.mark_dispatched(s, job_id=job_id, message="1 target(s) dispatched",
                                inputs={"intermediate_artifact_id": "art_x", "imatrix_artifact_ids": {}})
        s.execute(update(catalog.Job).where(catalog.Job.id == job_id)
                  .values(dispatched_at=catalog.models.utcnow() - timedelta(seconds=GRACE_S + 5)))
        s.commit()
    assert reconcile_once(rt, app) == []
    assert _queued_messages(redis_client) == []
    job = _get(rt, job_id)
    assert job["status"] == "failed" and job["targets"][0]["error"]["code"] == "invalid_message"
    assert reconcile_once(rt, app) == []


def test_cancel_ends_a_job_nobody_runs(rt, app, source_id):
    # Prepare stage whose worker died (lease expired): cancelled at once.
    dead = _job(rt, source_id, targets=("gguf:Q8_0", "gguf:F16"))
    _claim(rt, dead)
    _expire(rt, job_id=dead)
    with rt.session() as s:
        assert catalog.request_cancel(s, job_id=dead, actor="key:test").status == "cancelled"
        s.commit()
    assert [t["status"] for t in _get(rt, dead)["targets"]] == ["cancelled", "cancelled"]

    # A live lease: the cancel is asked for; once that worker is gone the reconciler ends it.
    alive = _job(rt, source_id)
    _claim(rt, alive)
    with rt.session() as s:
        assert catalog.request_cancel(s, job_id=alive, actor="key:test").status == "running"
        s.commit()
    assert reconcile_once(rt, app) == [] and _get(rt, alive)["status"] == "running"
    _expire(rt, job_id=alive)
    assert reconcile_once(rt, app) == []  # settled, nothing re-sent
    assert _get(rt, alive)["status"] == "cancelled"

    # A dispatched job whose target messages are gone: pending targets end at once.
    dispatched = _job(rt, source_id, targets=("gguf:Q8_0", "gguf:F16"))
    _claim(rt, dispatched)
    with rt.session() as s:
        catalog.mark_dispatched(s, job_id=dispatched, message="dispatched")
        s.commit()
        assert catalog.request_cancel(s, job_id=dispatched, actor="key:test").status == "cancelled"
        s.commit()
    assert [t["status"] for t in _get(rt, dispatched)["targets"]] == ["cancelled", "cancelled"]


def _result(tmp_path) -> ConversionResult:
    path = tmp_path / "model-Q8_0.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return ConversionResult(path=path, format="gguf", quantization="Q8_0", size_bytes=64, metadata={},
                            metrics={}, engine_version="test")


def _dispatched_target(rt, source_id, targets=("gguf:Q8_0",)):
    job_id = _job(rt, source_id, targets=targets)
    _claim(rt, job_id, worker_id=rt.worker_id)
    with rt.session() as s:
        catalog.mark_dispatched(s, job_id=job_id, message="dispatched")
        target_ids = [t.id for t in catalog.get_job(s, job_id=job_id).targets]
        for t in target_ids:
            assert catalog.claim_target(s, target_id=t, worker_id=rt.worker_id, lease_s=60, max_attempts=3).claimed
        s.commit()
    return job_id, target_ids


def _publish(rt, job_id, target_id, source_id, tmp_path):
    return publish(rt, job_id=job_id, target_id=target_id, source_id=source_id, result=_result(tmp_path),
                   key=f"artifacts/{job_id}/{target_id}/model-Q8_0.gguf", recipe={"r": 1}, digest="d" * 64)


def test_cancel_during_upload_wins(rt, source_id, tmp_path):
    job_id, (target_id,) = _dispatched_target(rt, source_id)
    with rt.session() as s:  # accepted while the worker uploads (its lease is live): 202
        assert catalog.request_cancel(s, job_id=job_id, actor="key:test").status == "running"
        s.commit()
    with pytest.raises(Cancelled):
        _publish(rt, job_id, target_id, source_id, tmp_path)
    assert rt.store.list_keys("artifacts/") == []  # the uploaded object is deleted again
    with rt.session() as s:
        assert s.execute(select(func.count()).select_from(catalog.Artifact)).scalar_one() == 0
    assert _get(rt, job_id)["artifact_ids"] == []


def test_cancel_after_the_record_is_too_late(rt, source_id, tmp_path):
    job_id, (target_id,) = _dispatched_target(rt, source_id)
    _publish(rt, job_id, target_id, source_id, tmp_path)
    assert _get(rt, job_id)["status"] == "succeeded"  # settled with the record, in one transaction
    with rt.session() as s:
        job = catalog.request_cancel(s, job_id=job_id, actor="key:test")
        s.commit()
        assert job.status == "succeeded" and not job.cancel_requested


def test_lease_lost_before_record_records_nothing(rt, source_id, tmp_path):
    from worker.watch import LeaseLost

    job_id, (target_id,) = _dispatched_target(rt, source_id)
    _expire(rt, target_id=target_id)
    with rt.session() as s:  # another worker took the target over
        assert catalog.claim_target(s, target_id=target_id, worker_id="other", lease_s=60, max_attempts=3).claimed
        s.commit()
    with pytest.raises(LeaseLost):
        _publish(rt, job_id, target_id, source_id, tmp_path)
    assert rt.store.list_keys("artifacts/") == []
    assert _get(rt, job_id)["targets"][0]["status"] == "running"


def test_failed_prepare_shows_targets_failed_with_the_cause(rt, source_id):
    job_id = _job(rt, source_id, targets=("gguf:Q8_0", "gguf:F16"))
    _claim(rt, job_id, max_attempts=1)
    with rt.session() as s:  # what the worker's main process notes when the pool process dies
        assert catalog.note_lost_attempt(s, job_id=job_id, cause="the worker process running it died "
                                         "(Worker exited prematurely: signal 9 (SIGKILL).)")
        s.commit()
    _expire(rt, job_id=job_id)
    assert _claim(rt, job_id, worker_id="w2", max_attempts=1).kind == "exhausted"
    job = _get(rt, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "attempts_exhausted"
    assert "signal 9" in job["error"]["message"]
    assert [t["status"] for t in job["targets"]] == ["failed", "failed"]
    assert all(t["error"] == job["error"] for t in job["targets"])

    # Without a noted cause, the expired lease is the cause.
    other = _job(rt, source_id)
    _claim(rt, other, max_attempts=1)
    _expire(rt, job_id=other)
    assert _claim(rt, other, worker_id="w2", max_attempts=1).kind == "exhausted"
    assert "worker dead-worker stopped renewing its lease" in _get(rt, other)["error"]["message"]


def test_unreachable_catalog_at_claim_keeps_the_message(tmp_path):
    settings = Settings(database_url=f"postgresql://postgres@127.0.0.1:{_free_port()}/none",
                        data_dir=tmp_path / "data")
    runtime = build_runtime(settings, worker_id="cut-off")
    with pytest.raises(CatalogUnavailable) as raised:
        run_job(runtime, "job_x", lambda *a: None)
    assert is_catalog_outage(raised.value)
    started = time.monotonic()
    assert wait_for_catalog(runtime.sessions, budget_s=1.0) is False
    assert time.monotonic() - started < 10
    # The reconciler's thread survives a pass that cannot reach the catalog, and skips the
    # expired-lease kinds on the next one.
    reconciler = Reconciler(runtime, make_celery(settings))
    assert reconciler.run() is None and reconciler._catalog_was_down


def test_embedded_broker_queue_is_read(tmp_path):
    """The filesystem broker of the embedded default: message files in one folder."""
    from quantyard.queue import enqueue_job, enqueue_target

    app = make_celery(Settings(data_dir=tmp_path / "data"))
    assert waiting_message_ids(app, ["cpu"]) == set()
    enqueue_job(app, job_id="job_a", hardware_class="cpu")
    from quantyard.engine.plan import TargetTask, plan_conversion

    plan = plan_conversion(source_sha256="ab" * 32, targets=["gguf:Q8_0"], source_format="gguf")
    enqueue_target(app, job_id="job_a", target_id="tgt_b", hardware_class="cpu",
                   task=TargetTask(step=plan.steps[0], source_sha256="ab" * 32,
                                   engine_version=plan.engine_version, source_format="gguf"))
    enqueue_job(app, job_id="job_c", hardware_class="cuda")
    assert waiting_message_ids(app, ["cpu"]) == {"job_a", "tgt_b"}
    assert waiting_message_ids(app, ["cpu", "cuda"]) == {"job_a", "tgt_b", "job_c"}


def test_a_dead_pool_process_releases_its_lease(rt, source_id):
    job_id = _job(rt, source_id)
    _claim(rt, job_id, worker_id="host:1:cpu")
    with rt.session() as s:
        assert not catalog.note_lost_attempt(s, job_id=job_id, cause="died", worker_id="host:2:cpu")
        assert catalog.note_lost_attempt(s, job_id=job_id, cause="the worker process running it died "
                                         "(Worker exited prematurely: signal 9 (SIGKILL))", worker_id="host:1:cpu")
        s.commit()
    job = _get(rt, job_id)
    assert job["status"] == "running" and job["error"]["code"] == "worker_lost"
    again = _claim(rt, job_id, worker_id="host:1:cpu")  # the requeued message: no lease to wait out
    assert (again.kind, again.attempt) == ("claimed", 2)
    assert _get(rt, job_id)["error"] is None  # being redone


def test_dispatch_inputs_are_found_while_their_event_is_still_pending(rt, source_id):
    """Deferred chaining: the job.dispatch event that records a job's target inputs may not be
    sealed yet when the reconciler looks (it was, once, in a clean-clone run); it reads pending
    events too. The chain lock is held so that nothing is sealed meanwhile."""
    from sqlalchemy import text

    from quantyard.catalog.audit import AUDIT_LOCK_KEY

    job_id = _job(rt, source_id, targets=("gguf:Q8_0",))
    inputs = {"intermediate_artifact_id": "art_pending", "imatrix_artifact_ids": {}}
    engine = rt.sessions.kw["bind"]
    with engine.connect() as holder:
        if engine.dialect.name == "postgresql":
            holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": AUDIT_LOCK_KEY})
        with rt.session() as s:
            catalog.mark_dispatched(s, job_id=job_id, message="dispatched", inputs=inputs)
            s.commit()
        with rt.session() as s:
            assert reconcile.dispatch_inputs(s, job_ids={job_id}) == {job_id: inputs}
        if engine.dialect.name == "postgresql":
            holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": AUDIT_LOCK_KEY})
            holder.commit()
