"""Nothing is lost by the queue, production shape: `quantyard api` and `quantyard worker`
processes on Postgres (a database of this test's own) and a redis-server of this test's own
without persistence (how most people run it), whose messages the test throws away (FLUSHALL:
what a Redis restart does to them). The workers' reconciler re-sends what the catalog says
should be moving, so every job still finishes; a whole worker killed mid-job is redone by the
other worker once its lease expires; a cancel of a job nobody runs ends it `cancelled`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from quantyard import catalog
from quantyard.catalog import reconcile
from tests.e2e.conftest import Stack, clean_env, free_port, upload, wait_for_job
from tests.fixtures.services import (
    _pg_url_for,
    _require_postgres,
    create_pg_database,
    drop_pg_database,
    service_unavailable,
)

pytestmark = pytest.mark.e2e

LEASE_S = 4
# Float targets only: their validation is quick (and does not depend on the quantizers).
# three targets that each get a task of their own (plain float targets are made in the prepare task)
THREE_TARGETS = ["gguf:Q8_0", "gguf:Q4_0", {"format": "gguf", "quantization": "F16", "params": {"split_max_size": "1G"}}]
INTERVAL_S = 1
GRACE_S = 3


class OwnRedis:
    """redis-server on a free port, no persistence; ``flush()`` loses every message."""

    def __init__(self, root):
        import redis

        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(root)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, socket_timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def waiting(self) -> int:
        return int(self.client.llen("convert.cpu"))

    def flush(self) -> None:
        self.client.flushall()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def lost_stack(tmp_path):
    """API + (started by the test) workers on an own Postgres database and an own Redis."""
    if shutil.which("redis-server") is None:
        service_unavailable("redis-server", "binary not found")
    _require_postgres()
    dbname = create_pg_database("quantyard_lost")
    redis = OwnRedis(tmp_path)
    port = free_port()
    env = clean_env(QUANTYARD_DATABASE_URL=_pg_url_for(dbname), QUANTYARD_BROKER_URL=redis.url,
                    QUANTYARD_DATA_DIR=str(tmp_path / "data"), QUANTYARD_PORT=str(port),
                    QUANTYARD_WORKER_HEARTBEAT_S="1", QUANTYARD_WORKER_STALE_AFTER_S="5",
                    QUANTYARD_JOB_LEASE_S=str(LEASE_S), QUANTYARD_RECONCILE_INTERVAL_S=str(INTERVAL_S),
                    QUANTYARD_RECONCILE_GRACE_S=str(GRACE_S))
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, log_dir=tmp_path)
    subprocess.run([sys.executable, "-m", "quantyard.cli", "db", "upgrade"], env=env, check=True,
                   capture_output=True)
    stack.start("api", "api")
    engine = catalog.make_engine(_pg_url_for(dbname))
    try:
        stack.wait_ready(workers=0)
        yield stack, redis, catalog.make_session_factory(engine)
    finally:
        stack.stop()
        redis.stop()
        engine.dispose()
        drop_pg_database(dbname)


def _start_worker(stack: Stack, name: str, *, wait: int) -> subprocess.Popen:
    proc = stack.start(name, "worker", "--hardware-class", "cpu", "--loglevel", "info")
    stack.wait_ready(workers=wait)
    return proc


def _kill_whole_worker(stack: Stack, worker_id: str) -> None:
    """SIGKILL the worker's main process and its pool (its own process group)."""
    pid = int(worker_id.split(":")[1])
    proc = next((p for p in stack.processes if p.pid == pid), None)
    assert proc is not None, (worker_id, [p.pid for p in stack.processes])
    _kill(stack, proc)


def _kill(stack: Stack, proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    stack.processes.remove(proc)  # an expected death: wait_ready must not take it for a crash


def _holder(sessions, job_id: str) -> str | None:
    """The worker on the job now: its prepare stage's, else a running target's."""
    with sessions() as s:
        job = catalog.get_job(s, job_id=job_id)
        if job.dispatched_at is None:
            return job.worker_id
        return next((t.worker_id for t in job.targets if t.status == "running"), None)


def _resends(sessions) -> dict[str, int]:
    with sessions() as s:
        return reconcile.resend_counts(s)


def _metric(client, name: str) -> str:
    return "\n".join(line for line in client.get("/metrics").text.splitlines() if line.startswith(name))


def test_jobs_queued_when_redis_loses_them_all_finish(lost_stack, tiny_llama_archive):
    stack, redis, sessions = lost_stack
    targets = [["gguf:F16"], ["gguf:BF16"], ["gguf:F32"], ["gguf:F16", "gguf:BF16"]]
    with stack.client() as client:
        source = upload(client, tiny_llama_archive, "tiny-llama")
        ids = [client.post("/v1/jobs", json={"source": source["id"], "targets": t}).json()["id"] for t in targets]
        assert redis.waiting() == len(ids)
        redis.flush()  # every message gone, as after a Redis restart without persistence
        lost_at = time.monotonic()
        assert client.get(f"/v1/jobs/{ids[0]}").json()["waiting_reason"].startswith("no live worker")
        _start_worker(stack, "worker-a", wait=1)
        jobs = [wait_for_job(client, job_id, timeout_s=300)[0] for job_id in ids]
        print(f"\n{len(ids)} lost jobs finished {time.monotonic() - lost_at:.1f} s after the flush")
        metric = _metric(client, "quantyard_reconciler_resends_total")
        depth = _metric(client, "quantyard_queue_depth")
    assert [j["status"] for j in jobs] == ["succeeded"] * len(ids), ([j["error"] for j in jobs], stack.logs())
    assert all(j["attempts"] == 1 for j in jobs), [j["attempts"] for j in jobs]  # a re-send, not a redo
    assert [len(j["artifact_ids"]) for j in jobs] == [len(t) for t in targets]
    assert _resends(sessions)["queued_job"] >= len(ids)
    assert 'kind="queued_job"' in metric and 'quantyard_queue_depth{hardware_class="cpu"} 0.0' in depth
    with sessions() as s:
        for job_id in ids:
            events = [e for e in catalog.audit_events(s, resource_type="job", resource_id=job_id)
                      if e.action == reconcile.RESEND_ACTION]
            assert events and events[-1].details["kind"] == "queued_job", job_id


def test_targets_lost_while_a_job_runs_still_finish(lost_stack, tiny_llama_archive):
    stack, redis, sessions = lost_stack
    _start_worker(stack, "worker-a", wait=1)
    with stack.client() as client:
        source = upload(client, tiny_llama_archive, "tiny-llama")
        job_id = client.post("/v1/jobs", json={"source": source["id"], "targets": THREE_TARGETS}).json()["id"]
        deadline = time.monotonic() + 120
        while redis.waiting() == 0 or client.get(f"/v1/jobs/{job_id}").json()["progress"] < 0.3:
            assert time.monotonic() < deadline, "the job's targets were never waiting in the queue"
            time.sleep(0.02)
        redis.flush()  # the target messages still waiting are gone
        job, _ = wait_for_job(client, job_id, timeout_s=300)
    assert job["status"] == "succeeded", (job, stack.logs())
    assert [t["status"] for t in job["targets"]] == ["succeeded"] * 3
    assert len(job["artifact_ids"]) == 3 == len(set(job["artifact_ids"]))
    assert _resends(sessions)["pending_target"] >= 1


def test_whole_worker_killed_job_is_redone_by_the_other(lost_stack, tiny_llama_archive):
    stack, _redis, sessions = lost_stack
    _start_worker(stack, "worker-a", wait=1)
    _start_worker(stack, "worker-b", wait=2)
    with stack.client() as client:
        source = upload(client, tiny_llama_archive, "tiny-llama")
        job_id = client.post("/v1/jobs", json={"source": source["id"], "targets": ["gguf:BF16"]}).json()["id"]
        running, _ = wait_for_job(client, job_id, until=("running", "succeeded", "failed"), timeout_s=60)
        assert running["status"] == "running", running
        holder = _holder(sessions, job_id)
        assert holder, running
        _kill_whole_worker(stack, holder)
        killed_at = time.monotonic()
        job, _ = wait_for_job(client, job_id, timeout_s=300)
        took = time.monotonic() - killed_at
    print(f"\nwhole worker killed: job {job['status']} {took:.1f} s later (lease {LEASE_S} s, "
          f"reconcile every {INTERVAL_S} s)")
    assert job["status"] == "succeeded", (job, stack.logs())
    redone = (job["attempts"] - 1) + sum(max(t["attempts"] - 1, 0) for t in job["targets"])
    assert redone == 1, job
    kinds = _resends(sessions)
    assert kinds["expired_job"] + kinds["expired_target"] >= 1, kinds


def test_cancel_of_a_job_whose_worker_is_gone_ends_it(lost_stack, tiny_llama_archive):
    stack, redis, sessions = lost_stack
    with stack.client() as client:
        source = upload(client, tiny_llama_archive, "tiny-llama")
        # A queued job whose message is gone: cancelled at once.
        queued = client.post("/v1/jobs", json={"source": source["id"], "targets": ["gguf:F16"]}).json()["id"]
        redis.flush()
        r = client.post(f"/v1/jobs/{queued}/cancel")
        assert (r.status_code, r.json()["status"]) == (200, "cancelled"), r.text

        # A running job whose whole worker was killed: the cancel is accepted and, once the lease
        # runs out, the surviving worker's reconciler settles it; nobody redoes it.
        worker = _start_worker(stack, "worker-a", wait=1)
        job_id = client.post("/v1/jobs", json={"source": source["id"], "targets": THREE_TARGETS}).json()["id"]
        running, _ = wait_for_job(client, job_id, until=("running", "succeeded", "failed"), timeout_s=60)
        assert running["status"] == "running", running
        _kill(stack, worker)
        r = client.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code in (200, 202), r.text
        _start_worker(stack, "worker-b", wait=1)
        job, _ = wait_for_job(client, job_id, timeout_s=LEASE_S * 10)
    assert job["status"] == "cancelled", (job, stack.logs())
    assert {t["status"] for t in job["targets"]} <= {"cancelled", "succeeded"}, job["targets"]
    assert job["attempts"] == 1, job


def test_catalog_outage_at_claim_keeps_the_messages(lost_stack, tiny_llama_archive):
    """The worker's catalog connections go through a proxy the test cuts (connections refused,
    open ones reset); the API keeps its own. With the reconciler off, only the worker's own
    handling can save the messages: claims fail, yet no job is failed or dropped, and all run
    once the catalog is back, without restarting the worker."""
    from sqlalchemy.engine import make_url

    from tests.faults.tcp_proxy import CuttableProxy

    stack, redis, _sessions = lost_stack
    direct = stack.env["QUANTYARD_DATABASE_URL"]
    url = make_url(direct)
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        stack.env.update(QUANTYARD_DATABASE_URL=url.set(host="127.0.0.1", port=proxy.port)
                         .render_as_string(hide_password=False),
                         QUANTYARD_RECONCILE_INTERVAL_S="0", QUANTYARD_CATALOG_WAIT_S="2")
        _start_worker(stack, "worker-a", wait=1)
        stack.env.update(QUANTYARD_DATABASE_URL=direct)
        with stack.client() as client:
            source = upload(client, tiny_llama_archive, "tiny-llama")
            proxy.cut()
            ids = [client.post("/v1/jobs", json={"source": source["id"], "targets": [t]}).json()["id"]
                   for t in ("gguf:F16", "gguf:BF16", "gguf:F32")]
            deadline = time.monotonic() + 60
            log = stack.log_dir / "worker-a.log"
            while log.read_text(errors="replace").count("keeping the message") < 2:
                assert time.monotonic() < deadline, stack.logs()
                time.sleep(0.2)
            time.sleep(3)  # a few more rounds of failed claims
            during = [client.get(f"/v1/jobs/{j}").json()["status"] for j in ids]
            proxy.restore()
            back_at = time.monotonic()
            jobs = [wait_for_job(client, j, timeout_s=300)[0] for j in ids]
        print(f"\ncatalog cut for the worker: {len(ids)} jobs finished {time.monotonic() - back_at:.1f} s "
              "after it came back")
    finally:
        proxy.close()
    assert during == ["queued"] * len(ids), during  # nothing failed or half-claimed meanwhile
    assert [j["status"] for j in jobs] == ["succeeded"] * len(ids), ([j["error"] for j in jobs], stack.logs())
    assert all(j["attempts"] == 1 for j in jobs), [j["attempts"] for j in jobs]
    assert "OperationalError" not in "".join(j["error"]["message"] if j["error"] else "" for j in jobs)
