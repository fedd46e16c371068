"""Background threads that keep a claim's lease alive and notice cancel requests.

The engine only learns about cancellation through its progress callback, so a watch turns a
cancel request in the catalog into an Event the callback checks; it also writes progress at a
bounded rate so a fast-ticking converter does not hammer the database. A job's shared work is
watched by `JobWatch`, each target's own task by `TargetWatch`.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError

from quantyard import catalog
from quantyard.engine.errors import Cancelled

log = logging.getLogger(__name__)


class LeaseLost(Cancelled):
    """Another worker claimed this work after our lease expired (we could not renew it: the
    catalog was unreachable, or this process was stopped for a while). The work is the other
    worker's now: stop, delete what we uploaded, and record nothing about the job or target."""

    code = "lease_lost"


class _Watch:
    min_write_interval_s = 1.0
    # The task's scratch-disk quota (worker.limits.ScratchQuota), checked by the watch thread;
    # a limit it hit is raised at the next progress callback.
    scratch = None
    limit_hit = None

    def __init__(self, runtime, job_id: str, lease_s: int):
        self.runtime, self.job_id, self.lease_s = runtime, job_id, lease_s
        self.cancelled = threading.Event()
        self.lease_lost = threading.Event()
        self._stop = threading.Event()
        self._last_write = 0.0
        self._thread: threading.Thread | None = None

    # What differs between a job and a target: how to renew, and how to record progress.
    def _renew(self, s) -> bool:
        raise NotImplementedError

    def _record(self, s, fraction: float, message: str | None) -> bool:
        raise NotImplementedError

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, name=f"watch-{self.job_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        interval = min(max(self.lease_s / 3, 0.5), 2.0)
        while not self._stop.wait(interval):
            try:
                self._tick()
            except Exception:  # the next tick retries; a dead DB shows up in the pipeline too
                log.exception("watch tick failed for %s", self.job_id)

    def _tick(self) -> None:
        if self.scratch is not None and self.limit_hit is None:
            self.limit_hit = self.scratch.check()
        with self.runtime.session() as s:
            ok = self._renew(s)
            job = catalog.get_job(s, job_id=self.job_id)
            s.commit()
        if not ok:
            self.lease_lost.set()
        if job is None or job.cancel_requested or job.status == "cancelled":
            self.cancelled.set()

    def raise_if_cancelled(self) -> None:
        if self.limit_hit is not None:
            raise self.limit_hit
        # A lost lease first: then the work (and a cancel of it) is the new holder's to settle.
        if self.lease_lost.is_set():
            raise LeaseLost("this worker lost its lease to another worker")
        if self.cancelled.is_set():
            raise Cancelled("the job was cancelled")

    def progress(self, fraction: float, message: str | None, *, force: bool = False) -> None:
        """Record progress (rate-limited) and stop the work if a cancel came in. A forced write
        marks a stage boundary: the scratch quota is measured there too, so a stage that ends
        between two of the watch thread's checks cannot slip past it."""
        if force and self.scratch is not None and self.limit_hit is None:
            self.limit_hit = self.scratch.check(now=True)
        self.raise_if_cancelled()
        now = time.monotonic()
        if not force and now - self._last_write < self.min_write_interval_s:
            return
        self._last_write = now
        try:
            with self.runtime.session() as s:
                stop = self._record(s, min(max(fraction, 0.0), 1.0), message)
                s.commit()
        except SQLAlchemyError as exc:
            # The catalog is down or frozen: progress is only informative, so the conversion
            # goes on (the watch thread keeps trying to renew the lease; once the catalog is
            # back the next write records where it is, and a cancel is seen then).
            log.warning("progress of %s not recorded (%s); going on", self.job_id, type(exc).__name__)
            return
        if stop:
            self.cancelled.set()
            self.raise_if_cancelled()


class JobWatch(_Watch):
    """Watches the job while one worker does its shared work (fetch, preflight, intermediate)."""

    def _renew(self, s) -> bool:
        return catalog.renew_lease(s, job_id=self.job_id, worker_id=self.runtime.worker_id,
                                   lease_s=self.lease_s)

    def _record(self, s, fraction: float, message: str | None) -> bool:
        # The shared work fills the first part of the job's bar; targets fill the rest.
        return catalog.set_progress(s, job_id=self.job_id, progress=fraction * catalog.PREPARE_SHARE,
                                    message=message)


class TargetWatch(_Watch):
    """Watches one target's task."""

    def __init__(self, runtime, job_id: str, target_id: str, lease_s: int):
        super().__init__(runtime, job_id, lease_s)
        self.target_id = target_id

    def _renew(self, s) -> bool:
        return catalog.renew_target_lease(s, target_id=self.target_id,
                                          worker_id=self.runtime.worker_id, lease_s=self.lease_s)

    def _record(self, s, fraction: float, message: str | None) -> bool:
        return catalog.set_target_progress(s, target_id=self.target_id, progress=fraction,
                                           message=message)
