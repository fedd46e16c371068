"""The worker's Celery app: shared config, the conversion task, and a catalog heartbeat.

Built by `create_worker_app()` when `quantyard worker` starts, never at import.
"""

from __future__ import annotations

import logging

from billiard.exceptions import WorkerLostError
from celery import Celery, bootsteps
from celery.signals import worker_shutdown
from celery.worker.request import Request

from quantyard import catalog
from quantyard.catalog.anchor import CHECK_EVERY_S, anchor_if_due, anchor_on_shutdown
from quantyard.catalog.retention import purge_due
from quantyard.logs import install_celery_json_logging, log_context
from quantyard.queue import (
    CONVERT_TARGET_TASK,
    CONVERT_TASK,
    enqueue_target,
    make_celery,
    queue_name,
)
from quantyard.settings import Settings, get_settings
from worker import hardware, metrics
from worker.outage import backoff_s, is_catalog_outage, wait_for_catalog
from worker.pipeline import run_job
from worker.reconciler import Reconciler
from worker.runtime import build_runtime, runtime_for_this_process
from worker.scratch import scratch_base, sweep_in_background
from worker.target_pipeline import run_target

log = logging.getLogger(__name__)


SOFT_SHUTDOWN_S = 60.0


def create_worker_app(settings: Settings | None = None, *, hardware_classes: list[str],
                      worker_id: str) -> Celery:
    settings = settings or get_settings()
    app = make_celery(settings, name="quantyard-worker")
    app.conf.task_queues = None
    app.conf.task_create_missing_queues = True
    # SIGTERM stays Celery's warm shutdown (the running conversion finishes within the pod's
    # grace period). A cold shutdown (SIGQUIT, a second Ctrl-C) becomes a soft one: the running
    # task gets this long, then it is terminated unacknowledged (acks_late) and Redis redelivers it.
    app.conf.worker_soft_shutdown_timeout = SOFT_SHUTDOWN_S
    _register_task(app, worker_id)
    _prepare_pool_processes(settings)
    _HeartbeatStep.config = (settings, hardware_classes, worker_id)
    app.steps["consumer"].add(_HeartbeatStep)
    metrics.install(app, settings, hardware_classes=hardware_classes)  # worker/metrics.py
    install_celery_json_logging(settings)  # QUANTYARD_LOG_FORMAT=json (quantyard/logs.py)
    return app


def _prepare_pool_processes(settings: Settings) -> None:
    """Every pool process converts under the memory limit (worker/limits.py): past it an
    allocation fails inside the task (resource_limit) instead of the OOM killer ending it.

    The main process freezes its heap for the garbage collector before the pool forks
    (quantyard/gc_tuning.py): the pool processes inherit it frozen, so their collections neither
    walk nor touch (copy-on-write) the pages they share with it."""
    from celery.signals import worker_init, worker_process_init

    from quantyard.gc_tuning import freeze_startup_heap
    from worker.limits import apply_memory_limit, memory_limit

    def apply(**_) -> None:
        apply_memory_limit(memory_limit(settings))

    worker_init.connect(lambda **_: freeze_startup_heap(), weak=False, dispatch_uid="quantyard-gc-freeze")
    worker_process_init.connect(apply, weak=False)


def _register_task(app: Celery, worker_id: str) -> None:
    # Tasks stay thin: everything about the work lives in the pipelines and the catalog.

    @app.task(name=CONVERT_TASK, bind=True, max_retries=None, Request=_NotingRequest)
    def convert_job(self, job_id: str) -> str:
        runtime = runtime_for_this_process(worker_id)
        with log_context(job_id=job_id, worker_id=worker_id):
            outcome = _keeping_message(self, runtime, lambda: run_job(runtime, job_id, _dispatcher(app, runtime)))
            log.info("job %s: %s", job_id, outcome)  # with the ids: Celery's own outcome line has none
        if outcome == "leased":
            # Another worker holds a live lease: either it is still working (this is a
            # duplicate delivery) or it just died and its lease will lapse. Look again once
            # the lease could have expired, until the job ends one way or the other.
            raise self.retry(countdown=runtime.settings.job_lease_s)
        return outcome

    @app.task(name=CONVERT_TARGET_TASK, bind=True, max_retries=None, Request=_NotingRequest)
    def convert_target(self, job_id: str, target_id: str, task: dict) -> str:
        # task: the target's step of the job's plan (TargetTask), parsed strictly by run_target
        runtime = runtime_for_this_process(worker_id)
        with log_context(job_id=job_id, target_id=target_id, worker_id=worker_id):
            outcome = _keeping_message(self, runtime, lambda: run_target(runtime, job_id, target_id, task))
            log.info("target %s of job %s: %s", target_id, job_id, outcome)
        if outcome == "leased":
            raise self.retry(countdown=runtime.settings.job_lease_s)
        return outcome


def _keeping_message(task, runtime, work):
    """Run ``work``; when the catalog cannot be reached, keep the message instead of failing
    (and so acking) it: wait here for the catalog with backoff (this process takes no other
    message meanwhile), then put the message back on the queue with a countdown (Celery's
    retry publishes it again before acking this delivery). A claim that did succeed is not
    lost either: its lease lapses and the next delivery re-claims it."""
    try:
        return work()
    except Exception as exc:
        if not is_catalog_outage(exc):
            raise
        log.warning("catalog unreachable in %s (%s: %s); keeping the message", task.name,
                    type(exc).__name__, exc)
        back = wait_for_catalog(runtime.sessions, budget_s=runtime.settings.catalog_wait_s)
        countdown = 1.0 if back else backoff_s(task.request.retries, base_s=2.0, cap_s=60.0)
        raise task.retry(countdown=countdown, exc=None) from None


class _NotingRequest(Request):
    """Notes in the catalog why a task's attempt ended when its pool process died (SIGKILL, the
    out-of-memory killer): Celery requeues the message (task_reject_on_worker_lost) and this
    runs in the worker's main process, the only one that knows. The cause is shown on the job or
    target while it waits to be redone, and in ``attempts_exhausted`` if it never is."""

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)
        if isinstance(exc, WorkerLostError):
            why = str(exc).split(" Job:")[0]  # billiard's own pool slot number means nothing here
            _note_lost(self.name, self.args, f"the worker process running it died ({why})")
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


_MAIN_RUNTIME: dict[str, object] = {}


def _note_lost(task_name: str, args, cause: str) -> None:
    runtime = _MAIN_RUNTIME.get("runtime")
    if runtime is None or not args:
        return
    target_id = args[1] if task_name == CONVERT_TARGET_TASK and len(args) > 1 else None
    try:
        with runtime.session() as s:
            # This worker's pool process died: its lease ends now, so the requeued message
            # re-claims at once instead of waiting out the lease.
            catalog.note_lost_attempt(s, job_id=args[0], target_id=target_id, cause=cause,
                                      worker_id=runtime.worker_id)
            s.commit()
    except Exception:  # only a note: the requeue goes on regardless
        log.exception("could not note the lost attempt of %s", args[0])


def _dispatcher(app: Celery, runtime):
    from quantyard.engine.plan import TargetTask

    def dispatch(job_id: str, target_id: str, task: dict) -> None:
        with runtime.session() as s:
            hardware_class = catalog.get_job(s, job_id=job_id).hardware_class
        enqueue_target(app, job_id=job_id, target_id=target_id, task=TargetTask.from_dict(task),
                       hardware_class=hardware_class)

    return dispatch


class _HeartbeatStep(bootsteps.StartStopStep):
    """Writes this worker's heartbeat to the catalog from the consumer's own event loop.

    The beat is an entry on the consumer's timer: on Redis (the production broker) that timer is
    run by the same event loop that pulls messages, so a consumer loop that hangs (e.g. after a
    broker reconnect) stops beating and the worker drops out of `live_workers`. With the embedded
    filesystem broker Celery has no event loop and the timer is a thread of its own: there the
    beat only proves the process and its consumer started. No beat while the consumer has no
    broker connection. On a warm shutdown the worker removes itself from the live set.
    """

    requires = {"celery.worker.consumer.tasks:Tasks"}
    config: tuple = ()

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self._entry = None
        self._anchor_entry = None
        self._purge_entry = None
        self._sweep_entry = None
        self._reconcile_entry = None
        self._runtime = None
        self._ids: dict[str, str] = {}

    def start(self, consumer) -> None:
        settings, classes, worker_id = self.config
        # No storage retries here: a blocked anchor or purge would stall this loop's beats.
        self._runtime = build_runtime(settings.model_copy(update={"storage_retry_s": 0.0}),
                                      worker_id=worker_id)
        info = hardware.detect().to_dict()
        info["queues"] = [queue_name(c) for c in classes]
        info["concurrency"] = settings.worker_concurrency
        self._ids = {c: worker_id if len(classes) == 1 else f"{worker_id}:{c}" for c in classes}

        def beat() -> None:
            try:
                if getattr(consumer.connection, "connected", True):
                    with self._runtime.session() as s:
                        for hardware_class, wid in self._ids.items():
                            catalog.worker_heartbeat(
                                s, worker_id=wid, hostname=worker_id.split(":")[0],
                                hardware_class=hardware_class, capabilities=info)
                        s.commit()
            except Exception:  # the next beat retries; a worker that can't beat looks dead
                log.exception("heartbeat failed")

        beat()
        self._entry = consumer.timer.call_repeatedly(settings.worker_heartbeat_s, beat)
        _MAIN_RUNTIME["runtime"] = self._runtime
        if settings.reconcile_interval_s > 0:
            # Re-send lost messages (worker/reconciler.py); one leader acts, on its own thread.
            reconciler = Reconciler(self._runtime, consumer.app)
            self._reconcile_entry = consumer.timer.call_repeatedly(settings.reconcile_interval_s,
                                                                   reconciler.tick)
        if settings.audit_anchor_interval_s > 0 or settings.audit_anchor_every_events > 0:
            # Periodic audit anchor, no Celery beat needed: every worker checks (every few seconds
            # with the count rule, else once a minute) and anchors when the last anchor is older
            # than the interval or N events behind (racing workers: one anchors, under a try-lock).
            period = CHECK_EVERY_S if settings.audit_anchor_every_events > 0 else 60.0
            self._anchor_entry = consumer.timer.call_repeatedly(
                min(settings.audit_anchor_interval_s or period, period), self._anchor_if_due)
        # And once more when this worker stops (after its last task), so it leaves no tail.
        worker_shutdown.connect(self._final_anchor, weak=False, dispatch_uid="quantyard-final-anchor")
        if settings.retention_purge_interval_s > 0:
            # Retention purge, the same way: each worker purges what is due (the row lock and the
            # re-check in purge_artifact make two workers purging at once harmless).
            self._purge_entry = consumer.timer.call_repeatedly(settings.retention_purge_interval_s,
                                                               self._purge_due)
        if settings.worker_sweep_interval_s > 0:
            # Dead processes' scratch folders and stale temporary objects (worker/scratch.py), now
            # and periodically, on a thread of its own so a store that is down stalls nothing.
            def sweep() -> None:
                sweep_in_background(self._runtime, scratch_base=scratch_base(settings))

            sweep()
            self._sweep_entry = consumer.timer.call_repeatedly(settings.worker_sweep_interval_s, sweep)

    def _anchor_if_due(self) -> None:
        try:
            anchor_if_due(self._runtime.sessions, self._runtime.store,
                          interval_s=self._runtime.settings.audit_anchor_interval_s,
                          every_events=self._runtime.settings.audit_anchor_every_events)
        except Exception:  # the next check retries
            log.exception("audit anchor failed")

    def _purge_due(self) -> None:
        try:
            purged = purge_due(self._runtime.sessions, self._runtime.store)
            if purged:
                log.info("retention: purged the bytes of %d deleted artifact(s)", len(purged))
        except Exception:  # the next run retries
            log.exception("retention purge failed")

    def _final_anchor(self, **_) -> None:
        if self._runtime is not None:
            anchor_on_shutdown(self._runtime.sessions, self._runtime.store)

    def stop(self, consumer) -> None:
        for entry in (self._anchor_entry, self._purge_entry, self._sweep_entry, self._reconcile_entry):
            if entry is not None:
                entry.cancel()
        self._anchor_entry = self._purge_entry = self._sweep_entry = self._reconcile_entry = None
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None
        if self._runtime is not None:
            try:
                with self._runtime.session() as s:
                    for wid in self._ids.values():
                        catalog.worker_stopped(s, worker_id=wid)
                    s.commit()
            except Exception:
                log.exception("could not remove this worker from the live set")
            anchor_on_shutdown(self._runtime.sessions, self._runtime.store)
