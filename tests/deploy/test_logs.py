"""Structured logs (QUANTYARD_LOG_FORMAT=json, quantyard/logs.py): the formatter's lines, the ids
of log_context, and real `quantyard api` and `quantyard worker` processes whose lines let one job
be followed from its submitting request to the worker that ran it."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta

import pytest

from quantyard.logs import JsonFormatter, current_ids, log_context
from tests.e2e import conftest as e2e
from tests.e2e.conftest import Stack, clean_env, free_port, upload, wait_for_job

tiny_llama_archive = e2e.tiny_llama_archive  # the e2e tests' fixture, here too


def _logged(fn) -> list[dict]:
    """What ``fn(logger)`` logs through a handler with the JSON formatter, one object per line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"quantyard.test_logs.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    fn(logger)
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_a_line_is_one_json_object_with_the_fields():
    [line] = _logged(lambda log: log.warning("converted %d of %s", 3, "tiny"))
    assert line["level"] == "WARNING"
    assert line["logger"].startswith("quantyard.test_logs.")
    assert line["message"] == "converted 3 of tiny"
    stamp = datetime.fromisoformat(line["time"])
    assert line["time"].endswith("Z") and stamp.utcoffset() == timedelta(0)
    assert abs(time.time() - stamp.timestamp()) < 60
    assert not {"job_id", "target_id", "worker_id", "request_id", "exception"} & set(line)


def test_log_context_ids_appear_nest_and_are_gone_after():
    def run(log):
        with log_context(job_id="j1", worker_id="w1"):
            log.info("outer")
            with log_context(target_id="t1", worker_id=None):
                log.info("inner")
            log.info("outer again")
        log.info("after")

    outer, inner, again, after = _logged(run)
    assert (outer["job_id"], outer["worker_id"]) == ("j1", "w1") and "target_id" not in outer
    assert (inner["job_id"], inner["target_id"], inner["worker_id"]) == ("j1", "t1", "w1")
    assert "target_id" not in again and again["job_id"] == "j1"
    assert not {"job_id", "target_id", "worker_id"} & set(after)
    assert current_ids() == {}
    with pytest.raises(TypeError):
        with log_context(jobid="typo"):
            pass


def test_a_record_s_own_ids_win_over_the_context():
    def run(log):
        with log_context(request_id="r1", job_id="from-context"):
            log.info("queued", extra={"job_id": "j2"})

    [line] = _logged(run)
    assert (line["request_id"], line["job_id"]) == ("r1", "j2")


def test_an_exception_carries_its_traceback():
    def failing_step():
        raise ValueError("tensor blk.0 is short")

    def run(log):
        try:
            failing_step()
        except ValueError:
            log.exception("target failed")

    [line] = _logged(run)
    assert line["level"] == "ERROR" and line["message"] == "target failed"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "failing_step" in line["exception"] and "ValueError: tensor blk.0 is short" in line["exception"]


def test_odd_records_still_give_a_line():
    class Unprintable:
        def __str__(self):
            raise RuntimeError("no str")

        __repr__ = __str__

    def run(log):
        log.info("%d items", "not a number")  # bad arguments: logging would print a traceback
        log.info({"a": 1})  # not a string
        log.info("extra", extra={"job_id": object()})  # not JSON: str()
        log.info(Unprintable())  # nothing about it can be printed

    bad_args, not_str, odd_extra, unprintable = _logged(run)
    assert "%d items" in bad_args["message"] and "not a number" in bad_args["message"]
    assert not_str["message"] == "{'a': 1}"
    assert odd_extra["job_id"].startswith("<object object")
    assert unprintable["level"] == "ERROR" and "unformattable" in unprintable["message"]


PROCESS_IDS = """
import io, json, logging
from quantyard.logs import JsonFormatter, log_context, set_process_ids
stream = io.StringIO()
handler = logging.StreamHandler(stream)
handler.setFormatter(JsonFormatter())
log = logging.getLogger("celery.worker.consumer")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.info("before")
set_process_ids(worker_id="host:1:cpu")
log.info("outside a task")
with log_context(job_id="j1", worker_id="host:2:cpu"):
    log.info("in a task")
try:
    set_process_ids(workerid="typo")
except TypeError:
    log.info("refused")
print(stream.getvalue())
"""


def test_process_ids_are_on_every_line_after_and_a_context_wins():
    """A worker's id set once for the process (quantyard worker) is on its every line, Celery's
    own outside a task too; in a process of its own, so nothing leaks into this one."""
    out = subprocess.run([sys.executable, "-c", PROCESS_IDS], capture_output=True, text=True, check=True).stdout
    before, outside, task, refused = (json.loads(line) for line in out.split("\n") if line.startswith("{"))
    assert "worker_id" not in before
    assert outside["worker_id"] == "host:1:cpu" and "job_id" not in outside
    assert (task["worker_id"], task["job_id"]) == ("host:2:cpu", "j1")
    assert refused["message"] == "refused" and refused["worker_id"] == "host:1:cpu"


# ----------------------------------------------------------------- real processes

def _json_lines(text: str) -> list[dict]:
    """Every line that is an object; a line starting with '{' must parse (no torn lines)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _wait_for_lines(stack: Stack, name: str, match, *, timeout_s: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for line in _json_lines((stack.log_dir / f"{name}.log").read_text(errors="replace"))
                 if match(line)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


@pytest.fixture(scope="module")
def json_stack(postgres_url, redis_url, tmp_path_factory):
    """`quantyard api` and a `quantyard worker` with QUANTYARD_LOG_FORMAT=json, on Postgres and
    Redis, objects in a local folder both processes share."""
    data_dir = tmp_path_factory.mktemp("json-logs")
    port = free_port()
    env = clean_env(QUANTYARD_DATABASE_URL=postgres_url, QUANTYARD_BROKER_URL=redis_url,
                    QUANTYARD_DATA_DIR=str(data_dir), QUANTYARD_PORT=str(port),
                    QUANTYARD_WORKER_HEARTBEAT_S="1", QUANTYARD_LOG_FORMAT="json")
    yield from e2e.api_and_worker(env, port, data_dir)


@pytest.mark.e2e
def test_api_lines_carry_the_request_id_it_echoed(json_stack):
    with json_stack.client() as client:
        given = client.get("/v1/capabilities", headers={"X-Request-ID": "logs-test-given-id"})
        made = client.get("/v1/jobs/no-such-job")
    assert given.headers["x-request-id"] == "logs-test-given-id"
    made_id = made.headers["x-request-id"]
    for request_id, path in (("logs-test-given-id", "/v1/capabilities"), (made_id, "/v1/jobs/no-such-job")):
        lines = _wait_for_lines(json_stack, "api", lambda line, r=request_id: line.get("request_id") == r)
        assert lines, json_stack.logs()
        # uvicorn's access line, through our formatter
        assert any(line["logger"] == "uvicorn.access" and path in line["message"] for line in lines), lines
        assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)


@pytest.mark.e2e
def test_one_job_is_followed_from_its_request_to_the_worker(json_stack, tiny_llama_archive):
    with json_stack.client() as client:
        source = upload(client, tiny_llama_archive, "tiny-llama-json-logs")
        created = client.post("/v1/jobs", json={"source": source["id"], "targets": ["gguf:Q8_0"]})
        assert created.status_code == 202, created.text
        job_id, request_id = created.json()["id"], created.headers["x-request-id"]
        job, _ = wait_for_job(client, job_id, timeout_s=120)
    assert job["status"] == "succeeded", (job, json_stack.logs())
    target_ids = {t["id"] for t in job["targets"]}

    # The API: the submitting request's line names the job.
    api_lines = _wait_for_lines(json_stack, "api", lambda line: line.get("job_id") == job_id)
    assert any(line.get("request_id") == request_id for line in api_lines), json_stack.logs()

    # The worker: the job's lines carry this worker's id (hostname:pid of `quantyard worker`:class),
    # its target's lines the target id too.
    worker_proc = json_stack.processes[1]
    worker_id = f"{socket.gethostname()}:{worker_proc.pid}:cpu"
    lines = _wait_for_lines(json_stack, "worker", lambda line: line.get("job_id") == job_id
                            and line.get("target_id") in target_ids)
    assert lines, json_stack.logs()
    assert all(line["worker_id"] == worker_id for line in lines), lines
    job_lines = _wait_for_lines(json_stack, "worker", lambda line: line.get("job_id") == job_id)
    assert any("target_id" not in line for line in job_lines), job_lines  # the job's own (prepare) task
    assert all(line["worker_id"] == worker_id for line in job_lines), job_lines
    # Celery's own lines, outside any task (consumer start, "ready"), carry the worker's id too
    own = _wait_for_lines(json_stack, "worker", lambda line: "job_id" not in line and line["logger"].startswith("celery"))
    assert own and all(line.get("worker_id") == worker_id for line in own), own[:5]
