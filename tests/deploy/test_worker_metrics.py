"""Worker metrics (worker/metrics.py): samples of several real processes summed in multiprocess
mode, a SIGKILLed process's in-progress gauge dropped, the main process's catalog and broker
state, and a real Prometheus scraping it all and answering the board's core queries."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from quantyard import catalog
from tests.deploy.conftest import start_prometheus
from worker import metrics

CHILD = textwrap.dedent("""
    import sys, time
    from worker import metrics
    mode = sys.argv[1]
    metrics.conversion_started(fmt="gguf", quantization="Q8_0", hardware_class="cpu")
    if mode == "hang":
        print("started", flush=True)
        time.sleep(600)
    with metrics.stage("quantize", fmt="gguf", hardware_class="cpu"):
        time.sleep(0.05)
    outcome = "failed" if mode == "fail" else "succeeded"
    metrics.conversion_finished(fmt="gguf", quantization="Q8_0", hardware_class="cpu", outcome=outcome,
                                code="validation_failed", bytes_read=1000, bytes_written=400)
""")


def _child(folder, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    return subprocess.Popen([sys.executable, "-c", CHILD, mode], env=env, stdout=subprocess.PIPE, text=True)


def _samples(folder) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def multiproc(tmp_path_factory):
    """Three pool-like processes: one succeeds, one fails, one is SIGKILLed mid-conversion."""
    folder = tmp_path_factory.mktemp("multiproc")
    metrics.wipe(folder)
    done = [_child(folder, "ok"), _child(folder, "fail")]
    hang = _child(folder, "hang")
    assert hang.stdout.readline().strip() == "started"
    for p in done:
        assert p.wait(timeout=60) == 0
    return folder, hang


def test_samples_of_all_processes_are_summed(multiproc):
    folder, hang = multiproc
    got = _samples(folder)
    labels = (("format", "gguf"), ("hardware_class", "cpu"), ("quantization", "Q8_0"))
    assert got[("quantyard_conversions_started_total", labels)] == 3
    ok = tuple(sorted((*labels, ("outcome", "succeeded"), ("code", ""))))
    failed = tuple(sorted((*labels, ("outcome", "failed"), ("code", "validation_failed"))))
    assert got[("quantyard_conversions_finished_total", ok)] == 1
    assert got[("quantyard_conversions_finished_total", failed)] == 1
    assert got[("quantyard_conversion_bytes_written_total", (("format", "gguf"), ("hardware_class", "cpu")))] == 800
    stage = (("format", "gguf"), ("hardware_class", "cpu"), ("stage", "quantize"))
    assert got[("quantyard_stage_duration_seconds_count", stage)] == 2
    assert got[("quantyard_stage_duration_seconds_sum", stage)] >= 0.1
    # the hanging one is still running
    assert got[("quantyard_conversions_in_progress", (("hardware_class", "cpu"),))] == 1


def test_a_killed_process_stops_counting_as_in_progress(multiproc):
    folder, hang = multiproc
    hang.send_signal(signal.SIGKILL)
    hang.wait(timeout=30)
    metrics.sweep_dead(folder)
    got = _samples(folder)
    assert got.get(("quantyard_conversions_in_progress", (("hardware_class", "cpu"),)), 0) == 0
    # its counters stay: the work it started did happen
    labels = (("format", "gguf"), ("hardware_class", "cpu"), ("quantization", "Q8_0"))
    assert got[("quantyard_conversions_started_total", labels)] == 3


def test_wipe_empties_the_folder(tmp_path):
    (tmp_path / "counter_1.db").write_bytes(b"x")
    metrics.wipe(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def state_collector(catalog_url, redis_url):
    import redis

    engine = catalog.make_engine(catalog_url)
    sessions = catalog.make_session_factory(engine)
    hardware_class = f"test{uuid.uuid4().hex[:8]}"  # its own Redis list: no real queue touched
    client = redis.Redis.from_url(redis_url)
    client.rpush(f"convert.{hardware_class}", "a", "b", "c")
    with sessions.begin() as s:
        catalog.worker_heartbeat(s, worker_id="w:1:x", hostname="w", hardware_class=hardware_class, capabilities={})
        source = catalog.create_source(s, name="m", sha256="b" * 64, size_bytes=10, uri="file:///x", storage_key="x",
                                       architecture="LlamaForCausalLM", metadata={}, actor="key:test")
        job = catalog.create_job(s, source_id=source.id, targets=["gguf:Q8_0"], hardware_class=hardware_class,
                                 labels={}, actor="key:test", request=catalog.RequestInfo("r", "127.0.0.1", "t"))
    with sessions.begin() as s:
        catalog.claim_job(s, job_id=job.id, worker_id="w:1:x", lease_s=60, max_attempts=3)
        s.execute(update(catalog.Job).where(catalog.Job.id == job.id).values(
            lease_expires_at=datetime.now(UTC) - timedelta(minutes=5)))
    yield metrics.WorkerStateCollector(settings=metrics.Settings(), hardware_classes=[hardware_class],
                                       sessions=sessions, broker_client=client), hardware_class
    client.delete(f"convert.{hardware_class}")
    engine.dispose()


def test_main_process_reports_catalog_and_broker_state(state_collector):
    collector, hardware_class = state_collector
    got = {(f.name, tuple(s.labels.values())): s.value for f in collector.collect() for s in f.samples}
    assert got[("quantyard_broker_queue_length", (hardware_class,))] == 3
    assert got[("quantyard_workers_live", (hardware_class,))] == 1
    assert got[("quantyard_jobs_lease_expired", (hardware_class,))] == 1
    assert got[("quantyard_audit_unanchored_seconds", ())] >= 0  # create_job was audited


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("catalog_url", ["postgres"], indirect=True)  # one run is enough here
def test_prometheus_scrapes_a_worker_and_answers_the_core_queries(multiproc, state_collector, tmp_path, monkeypatch):
    folder, _ = multiproc
    collector, hardware_class = state_collector
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    port = _free_port()
    server = metrics.serve(port, collector, addr="127.0.0.1")
    try:
        assert "quantyard_conversions_finished_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        prom = start_prometheus(tmp_path, {"quantyard-workers": [f"127.0.0.1:{port}"]})
        try:
            queries = {
                "queue": f'max by (hardware_class) (quantyard_broker_queue_length{{hardware_class="{hardware_class}"}})',
                "finished": "sum by (outcome) (quantyard_conversions_finished_total)",
                "stages": "histogram_quantile(0.95, sum by (le, stage) (quantyard_stage_duration_seconds_bucket))",
                "live": "max by (hardware_class) (quantyard_workers_live)",
            }
            deadline = time.monotonic() + 30
            results: dict = {}
            while time.monotonic() < deadline:
                results = {k: prom.query(q)["data"]["result"] for k, q in queries.items()}
                if all(results.values()):
                    break
                time.sleep(0.5)
            assert all(results.values()), {k: v for k, v in results.items() if not v}
            assert float(results["queue"][0]["value"][1]) == 3
            assert {r["metric"]["outcome"] for r in results["finished"]} == {"succeeded", "failed"}
        finally:
            prom.stop()
    finally:
        server.shutdown()


def _seconds(stage: str) -> tuple[float, float]:
    labels = {"stage": stage, "format": "test-fmt", "hardware_class": "test-class"}
    count = REGISTRY.get_sample_value("quantyard_stage_duration_seconds_count", labels) or 0.0
    total = REGISTRY.get_sample_value("quantyard_stage_duration_seconds_sum", labels) or 0.0
    return count, total


def test_the_clock_observes_each_phase_once_for_its_own_time():
    before = {s: _seconds(s) for s in ("quantize", "validate", "evaluate")}
    with metrics.stage_clock("quantize", fmt="test-fmt", hardware_class="test-class") as clock:
        time.sleep(0.05)
        clock.mark("quantize")  # the same phase again: still one observation
        time.sleep(0.05)
        clock.mark("validate")
        time.sleep(0.02)
        clock.mark("evaluate")
    after = {s: _seconds(s) for s in before}
    counts = {s: after[s][0] - before[s][0] for s in before}
    spent = {s: after[s][1] - before[s][1] for s in before}
    assert counts == {"quantize": 1, "validate": 1, "evaluate": 1}
    assert 0.1 <= spent["quantize"] < 0.5 and 0.02 <= spent["validate"] < 0.3 and spent["evaluate"] < 0.1
