"""Worker metrics for Prometheus, in prometheus-client's multiprocess mode.

Conversions run in Celery's prefork pool processes; each writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (set before the worker starts: the images' entrypoint sets and wipes
it) and the worker's main process serves them all, summed, on ``QUANTYARD_WORKER_METRICS_PORT``
(9600) from a registry with a ``MultiProcessCollector``. The main process adds what it reads at
scrape time: the Redis list length of each queue it consumes (what KEDA scales on), live workers,
jobs and targets running past their lease, and the age of the oldest audit event not anchored.

Labels are low-cardinality on purpose: format, quantization, hardware class, outcome, error code,
stage; never a job id, a model name or a worker id (the scrape target already names the pod).
Without ``PROMETHEUS_MULTIPROC_DIR`` nothing is served (samples stay in each process's memory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily

from quantyard.queue import CONVERT_TARGET_TASK, CONVERT_TASK, queue_name
from quantyard.settings import Settings

log = logging.getLogger(__name__)

OUTCOMES = ("succeeded", "failed", "cancelled")
STAGE_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600)

STARTED = Counter("quantyard_conversions_started", "Conversion tasks taken by this worker",
                  ["format", "quantization", "hardware_class"])
FINISHED = Counter("quantyard_conversions_finished",
                   "Conversion tasks ended, by outcome (succeeded, failed, cancelled, not_run) and error code",
                   ["format", "quantization", "hardware_class", "outcome", "code"])
IN_PROGRESS = Gauge("quantyard_conversions_in_progress", "Conversions running now", ["hardware_class"],
                    multiprocess_mode="livesum")
STAGE_SECONDS = Histogram("quantyard_stage_duration_seconds", "Time spent per stage of a conversion",
                          ["stage", "format", "hardware_class"], buckets=STAGE_BUCKETS)
BYTES_READ = Counter("quantyard_conversion_bytes_read", "Source bytes a finished conversion read",
                     ["format", "hardware_class"])
BYTES_WRITTEN = Counter("quantyard_conversion_bytes_written", "Artifact bytes a finished conversion wrote",
                        ["format", "hardware_class"])


def multiproc_dir() -> Path | None:
    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(value) if value else None


@contextmanager
def stage(name: str, *, fmt: str, hardware_class: str) -> Iterator[None]:
    """Time one stage (fetch, intermediate, quantize, validate, upload, ...) of a conversion."""
    start = time.monotonic()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(name, fmt, hardware_class).observe(time.monotonic() - start)


def hardware_class_of(rt) -> str:
    return rt.worker_id.rsplit(":", 1)[-1]


def target_stage(name: str, rt, spec) -> contextlib.AbstractContextManager[None]:
    """``stage`` for a target's pipeline: its format, the worker's hardware class."""
    return stage(name, fmt=spec.format, hardware_class=hardware_class_of(rt))


def prepare_stage(name: str, rt) -> contextlib.AbstractContextManager[None]:
    """``stage`` for the prepare task's shared work (format label "prepare", as its task's)."""
    return stage(name, fmt="prepare", hardware_class=hardware_class_of(rt))


class StageClock:
    """Consecutive stages of one engine step, each observed on its own: ``mark`` ends the running
    stage and starts the named one (the engine's progress messages say which: stages.phase_of);
    ``close`` ends the last."""

    def __init__(self, first: str, *, fmt: str, hardware_class: str):
        self.current, self.fmt, self.hardware_class = first, fmt, hardware_class
        self.start = time.monotonic()

    def mark(self, name: str) -> None:
        if name != self.current:
            self._observe()
            self.current, self.start = name, time.monotonic()

    def close(self) -> None:
        self._observe()

    def _observe(self) -> None:
        STAGE_SECONDS.labels(self.current, self.fmt, self.hardware_class).observe(time.monotonic() - self.start)


@contextmanager
def stage_clock(first: str, *, fmt: str, hardware_class: str) -> Iterator[StageClock]:
    clock = StageClock(first, fmt=fmt, hardware_class=hardware_class)
    try:
        yield clock
    finally:
        clock.close()


def conversion_started(*, fmt: str, quantization: str, hardware_class: str) -> None:
    STARTED.labels(fmt, quantization, hardware_class).inc()
    IN_PROGRESS.labels(hardware_class).inc()


def conversion_finished(*, fmt: str, quantization: str, hardware_class: str, outcome: str, code: str = "",
                        bytes_read: int = 0, bytes_written: int = 0) -> None:
    outcome = outcome if outcome in OUTCOMES else "not_run"
    FINISHED.labels(fmt, quantization, hardware_class, outcome, code if outcome == "failed" else "").inc()
    IN_PROGRESS.labels(hardware_class).dec()
    if bytes_read:
        BYTES_READ.labels(fmt, hardware_class).inc(bytes_read)
    if bytes_written:
        BYTES_WRITTEN.labels(fmt, hardware_class).inc(bytes_written)


# ------------------------------------------------------------------ the main process: scrape server


def wipe(folder: Path) -> None:
    """Empty the folder before any process of this worker writes to it (a restarted container's
    old files would be added to the new counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.is_file():
            path.unlink()


def sweep_dead(folder: Path) -> None:
    """``mark_process_dead`` for every pool process gone without saying so (SIGKILL, the OOM
    killer): its live gauges would otherwise count forever."""
    for path in folder.glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, str(folder))
        except PermissionError:  # someone else's live process
            pass


class WorkerStateCollector:
    """Read at scrape time in the main process (not from the pool: no custom collector there)."""

    def __init__(self, *, settings: Settings, hardware_classes: list[str], sessions, broker_client=None):
        self.settings = settings
        self.classes = list(hardware_classes)
        self.sessions = sessions
        self.broker_client = broker_client  # a redis.Redis, or None (embedded broker)

    def describe(self):
        return []

    def collect(self):
        folder = multiproc_dir()
        if folder is not None:
            sweep_dead(folder)
        if self.broker_client is not None:
            yield self._queue_lengths()
        try:
            yield from self._catalog_state()
        except Exception as exc:  # a scrape must answer even when the catalog does not
            log.warning("metrics: catalog unreadable: %s", type(exc).__name__)

    def _queue_lengths(self) -> GaugeMetricFamily:
        g = GaugeMetricFamily("quantyard_broker_queue_length", "Messages waiting in the Redis list of the queue",
                              labels=["hardware_class"])
        for hardware_class in self.classes:
            try:
                g.add_metric([hardware_class], float(self.broker_client.llen(queue_name(hardware_class))))
            except Exception as exc:
                log.warning("metrics: broker unreadable: %s", type(exc).__name__)
        return g

    def _catalog_state(self):
        from sqlalchemy import func, select

        from quantyard import catalog
        from quantyard.catalog.anchor import _last_anchor
        from quantyard.catalog.models import AuditEvent, Job, JobTarget, utcnow

        live = GaugeMetricFamily("quantyard_workers_live", "Workers with a fresh heartbeat", labels=["hardware_class"])
        expired = GaugeMetricFamily("quantyard_jobs_lease_expired", "Jobs and targets running past their lease",
                                    labels=["hardware_class"])
        with self.sessions() as s:
            now = utcnow()
            workers = catalog.live_workers(s, stale_after_s=self.settings.worker_stale_after_s)
            jobs = dict(s.execute(select(Job.hardware_class, func.count()).where(
                Job.status == "running", Job.lease_expires_at < now).group_by(Job.hardware_class)).all())
            targets = dict(s.execute(select(Job.hardware_class, func.count()).join(JobTarget, JobTarget.job_id == Job.id)
                                     .where(JobTarget.status == "running", JobTarget.lease_expires_at < now)
                                     .group_by(Job.hardware_class)).all())
            last = _last_anchor(s)
            oldest = s.execute(select(func.min(AuditEvent.at)).where(
                AuditEvent.seq > (last.seq if last is not None else 0))).scalar()
        for hardware_class in sorted(set(self.classes) | {w.hardware_class for w in workers}):
            live.add_metric([hardware_class], sum(w.hardware_class == hardware_class for w in workers))
            expired.add_metric([hardware_class], jobs.get(hardware_class, 0) + targets.get(hardware_class, 0))
        unanchored = GaugeMetricFamily("quantyard_audit_unanchored_seconds",
                                       "Age of the oldest audit event after the newest anchor (0: all anchored)")
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=now.tzinfo)
        unanchored.add_metric([], max((now - oldest) / timedelta(seconds=1), 0.0) if oldest is not None else 0.0)
        yield from (live, expired, unanchored)


def serve(port: int, collector: WorkerStateCollector | None, *, addr: str = "0.0.0.0"):
    """The main process's /metrics: every process's samples (multiprocess files, read afresh on
    each scrape) + the collector. Returns the HTTP server (``shutdown()`` stops it)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    if collector is not None:
        registry.register(collector)
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server


# ------------------------------------------------------------------------- Celery wiring


def _task_labels(sender_name: str, args) -> tuple[str, str]:
    """(format, quantization) of a task's message; the prepare task converts no target itself."""
    if sender_name == CONVERT_TARGET_TASK and len(args) >= 3 and isinstance(args[2], dict):
        spec = (args[2].get("step") or {}).get("spec") or {}
        return str(spec.get("format", "unknown"))[:20], str(spec.get("quantization", "unknown"))[:20]
    return "prepare", ""


def _finished_from_catalog(target_id: str) -> tuple[str, int, int]:
    """(error code, source bytes, artifact bytes) of a target the catalog says ended."""
    from quantyard import catalog
    from quantyard.catalog.models import JobTarget
    from worker.runtime import runtime_for_this_process

    rt = runtime_for_this_process()
    with rt.session() as s:
        target = s.get(JobTarget, target_id)
        if target is None:
            return "", 0, 0
        source = catalog.get_source(s, source_id=target.job.source_id)
        artifact = catalog.get_artifact(s, artifact_id=target.artifact_id) if target.artifact_id else None
        return (target.error_code or "", source.size_bytes if source else 0,
                artifact.size_bytes if artifact is not None and not target.reused else 0)


def install(app, settings: Settings, *, hardware_classes: list[str]) -> None:
    """Record conversions from Celery's task signals and serve the metrics from the main process
    (only in multiprocess mode, i.e. with PROMETHEUS_MULTIPROC_DIR set)."""
    from celery.signals import task_postrun, task_prerun, worker_init, worker_process_shutdown

    folder = multiproc_dir()
    if folder is None:
        return
    wipe(folder)
    hardware_class = hardware_classes[0] if len(hardware_classes) == 1 else "+".join(hardware_classes)
    started: dict[str, float] = {}

    def prerun(task_id=None, task=None, args=(), **_):
        if task is None or task.name not in (CONVERT_TASK, CONVERT_TARGET_TASK):
            return
        fmt, quantization = _task_labels(task.name, args)
        started[task_id] = time.monotonic()
        conversion_started(fmt=fmt, quantization=quantization, hardware_class=hardware_class)

    def postrun(task_id=None, task=None, args=(), retval=None, **_):
        if task is None or task_id not in started:
            return
        fmt, quantization = _task_labels(task.name, args)
        STAGE_SECONDS.labels("target" if task.name == CONVERT_TARGET_TASK else "prepare", fmt,
                             hardware_class).observe(time.monotonic() - started.pop(task_id))
        outcome = retval if isinstance(retval, str) else "failed"
        code, read, written = "", 0, 0
        if task.name == CONVERT_TARGET_TASK and outcome in OUTCOMES:
            try:
                code, read, written = _finished_from_catalog(args[1])
            except Exception as exc:  # only metrics: never fail the task for them
                log.warning("metrics: target %s unreadable: %s", args[1], type(exc).__name__)
        conversion_finished(fmt=fmt, quantization=quantization, hardware_class=hardware_class, outcome=outcome,
                            code=code or ("internal_error" if outcome == "failed" else ""),
                            bytes_read=read, bytes_written=written)

    def child_exit(**_):
        multiprocess.mark_process_dead(os.getpid(), str(folder))

    def start_server(**_):
        try:
            serve(settings.worker_metrics_port, _collector(app, settings, hardware_classes))
        except OSError as exc:  # a port in use must not stop the worker
            log.warning("worker metrics not served: %s", exc)

    # dispatch_uid: a second app in the same process (tests) does not record twice
    task_prerun.connect(prerun, weak=False, dispatch_uid="quantyard-metrics-prerun")
    task_postrun.connect(postrun, weak=False, dispatch_uid="quantyard-metrics-postrun")
    worker_process_shutdown.connect(child_exit, weak=False, dispatch_uid="quantyard-metrics-child-exit")
    worker_init.connect(start_server, weak=False, dispatch_uid="quantyard-metrics-server")


def _collector(app, settings: Settings, hardware_classes: list[str]) -> WorkerStateCollector:
    from quantyard import catalog

    client = None
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    engine = catalog.make_engine(settings.resolved_database_url)
    return WorkerStateCollector(settings=settings, hardware_classes=hardware_classes,
                                sessions=catalog.make_session_factory(engine), broker_client=client)
