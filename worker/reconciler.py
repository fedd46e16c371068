"""The reconciler: re-sends the queue message of every job or target that may have lost it.

Job state lives in the catalog and the broker only carries messages, so whatever the broker
loses (Redis restarted without persistence, a whole worker killed with its messages unacked
until the visibility timeout, hours later) is found by asking the catalog what should be moving
and is not (``quantyard.catalog.reconcile.find_lost``), and sent again. Every worker runs
``Reconciler.tick`` from its consumer timer every ``reconcile_interval_s``; one leader at a time
acts (``catalog.reconcile.leader_lock``: a Postgres advisory lock, a file lock on SQLite). A
duplicate message is harmless: the catalog's claim lets exactly one delivery do the work.

A job whose worker died is re-sent once its lease has expired, so it is redone by another
worker within about one lease period plus one reconcile interval. Right after a catalog
outage the expired-lease kinds wait one interval: live workers could not renew their leases
meanwhile and get the chance to first.

Public entry points (also for tests and fault drills): ``reconcile_once`` and ``Reconciler``.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from celery import Celery
from sqlalchemy import select

from quantyard import catalog
from quantyard.catalog import reconcile
from quantyard.engine.plan import InvalidPlan, TargetTask
from quantyard.queue import enqueue_job, enqueue_target, waiting_message_ids
from worker.outage import is_catalog_outage

log = logging.getLogger(__name__)


def _active_classes(s) -> list[str]:
    q = select(catalog.Job.hardware_class).where(catalog.Job.status.in_(("queued", "running"))).distinct()
    return sorted(s.execute(q).scalars())


def _send(app: Celery, r: reconcile.Resend) -> None:
    """Re-send one message; a target's is its step as the prepare task recorded it in the job's
    dispatch record ({"tasks": {target id: TargetTask}}), parsed as strictly as the task will."""
    if r.target_id is None:
        enqueue_job(app, job_id=r.job_id, hardware_class=r.hardware_class)
    else:
        task = TargetTask.from_dict((r.inputs.get("tasks") or {}).get(r.target_id))
        enqueue_target(app, job_id=r.job_id, target_id=r.target_id, task=task, hardware_class=r.hardware_class)


def _fail_unsendable(rt, r: reconcile.Resend, exc: InvalidPlan) -> None:
    """A target whose recorded step cannot be sent (a record older than the plan, or damaged)
    would be found lost on every pass: fail it, saying why, and let its job settle."""
    log.warning("reconciler: target %s has no valid recorded step (%s); failing it", r.target_id, exc)
    with rt.session() as s:
        catalog.finish_target(s, target_id=r.target_id, status="failed", error_code="invalid_message",
                              error_message=f"its recorded step cannot be re-sent: {exc}")
        s.commit()


def settle_abandoned(rt, *, now: datetime | None = None) -> list[str]:
    """End running jobs that need no message, only settling (cancelled with nobody on them,
    or every target finished): ``catalog.close_abandoned`` on each; returns the ids that finished."""
    with rt.session() as s:
        job_ids = reconcile.jobs_to_settle(s, now=now)
    finished = []
    for job_id in job_ids:
        with rt.session() as s:
            if catalog.close_abandoned(s, job_id=job_id, actor=f"worker:{rt.worker_id}") is not None:
                finished.append(job_id)
            s.commit()
    return finished


def reconcile_once(rt, app: Celery, *, expired: bool = True,
                   now: datetime | None = None) -> list[reconcile.Resend] | None:
    """One pass: None when another process holds the leader lock, else the messages re-sent
    (each audited as ``job.resend`` and counted in ``reconciler_resends``). ``rt``: a
    WorkerRuntime (sessions, settings, worker_id); ``app``: the Celery app to send with.
    ``expired=False`` leaves expired leases alone this pass. Raises on a catalog outage."""
    settings = rt.settings
    engine = rt.sessions.kw["bind"]
    with reconcile.leader_lock(engine) as leader:
        if not leader:
            return None
        settled = settle_abandoned(rt, now=now)
        if settled:
            log.info("reconciler: settled %d job(s) nobody was running: %s", len(settled), ", ".join(settled))
        with rt.session() as s:
            classes = _active_classes(s)
        waiting = waiting_message_ids(app, classes) if classes else set()
        with rt.session() as s:
            found = reconcile.find_lost(s, grace_s=settings.reconcile_grace_s,
                                        stale_after_s=settings.worker_stale_after_s, waiting=waiting,
                                        expired=expired, now=now)
        sent = []
        for r in found:
            try:
                _send(app, r)
            except InvalidPlan as exc:
                _fail_unsendable(rt, r, exc)
                continue
            except Exception as exc:  # the broker is down: the next pass tries again
                log.warning("reconciler: could not re-send %s %s: %s: %s", r.kind, r.target_id or r.job_id,
                            type(exc).__name__, exc)
                break
            sent.append(r)
            log.info("reconciler: re-sent %s %s (%s)", r.kind, r.target_id or r.job_id, r.reason)
        if sent:
            with rt.session() as s:
                reconcile.record_resends(s, resends=sent, actor=f"worker:{rt.worker_id}")
                s.commit()
        return sent


class Reconciler:
    """Runs ``reconcile_once`` on a thread of its own each time ``tick`` is called (from the
    consumer timer): a slow or frozen catalog must not stall the consumer's event loop, which
    also pulls messages and beats the heartbeat. A tick while a pass still runs is skipped."""

    def __init__(self, rt, app: Celery):
        self.rt, self.app = rt, app
        self._thread: threading.Thread | None = None
        self._catalog_was_down = False

    def tick(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self.run, name="reconciler", daemon=True)
        self._thread.start()

    def run(self) -> list[reconcile.Resend] | None:
        try:
            sent = reconcile_once(self.rt, self.app, expired=not self._catalog_was_down)
        except Exception as exc:
            self._catalog_was_down = is_catalog_outage(exc)
            if self._catalog_was_down:
                log.warning("reconciler: catalog unreachable (%s); next pass in one interval",
                            type(exc).__name__)
            else:
                log.exception("reconciler pass failed")
            return None
        self._catalog_was_down = False
        return sent

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
