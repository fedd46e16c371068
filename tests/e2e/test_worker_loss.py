"""A worker process killed mid-job (as the OOM killer would) on a Redis broker: the message is
requeued (acks_late + task_reject_on_worker_lost), the job is redone once, and it succeeds."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.e2e.conftest import Stack, clean_env, free_port, upload, wait_for_job

pytestmark = pytest.mark.e2e


@pytest.fixture
def redis_stack(redis_url, tmp_path):
    # Its own Redis database, so the session's production stack can't take its messages.
    broker = redis_url.rsplit("/", 1)[0] + "/12"
    port = free_port()
    env = clean_env(QUANTYARD_DATA_DIR=str(tmp_path), QUANTYARD_BROKER_URL=broker,
                    QUANTYARD_PORT=str(port), QUANTYARD_WORKER_HEARTBEAT_S="1",
                    QUANTYARD_JOB_LEASE_S="3")
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, log_dir=tmp_path)
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "quantyard.cli", "db", "upgrade"], env=env, check=True,
                   capture_output=True)
    stack.start("api", "api")
    worker = stack.start("worker", "worker", "--hardware-class", "cpu", "--loglevel", "info")
    try:
        stack.wait_ready()
        yield stack, worker
    finally:
        stack.stop()
        import redis

        redis.Redis.from_url(broker).flushdb()


def _task_child(worker_pid: int) -> psutil.Process:
    """The prefork pool process that executes tasks (a child of the Celery main process)."""
    main = psutil.Process(worker_pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = main.children(recursive=True)
        if children:
            return children[0]
        time.sleep(0.1)
    raise AssertionError("the worker has no pool process")


def test_killed_worker_process_job_is_redone_once(redis_stack, tiny_llama_archive):
    stack, worker = redis_stack
    with stack.client() as client:
        source = upload(client, tiny_llama_archive, "tiny-llama")
        created = client.post("/v1/jobs", json={
            "source": source["id"],
            "targets": ["gguf:F32", "gguf:F16", "gguf:BF16", "gguf:Q8_0"]})
        job_id = created.json()["id"]
        running, _ = wait_for_job(client, job_id, until=("running", "succeeded", "failed"),
                                  timeout_s=60)
        assert running["status"] == "running", running
        os.kill(_task_child(worker.pid).pid, signal.SIGKILL)

        job, _ = wait_for_job(client, job_id, timeout_s=300)
    assert job["status"] == "succeeded", (job, stack.logs())
    # The killed task (the job's shared work or one target's) ran exactly once more.
    redone = (job["attempts"] - 1) + sum(max(t["attempts"] - 1, 0) for t in job["targets"])
    assert redone == 1, job
    assert len(job["artifact_ids"]) == 4
    assert sorted(t["status"] for t in job["targets"]) == ["succeeded"] * 4
