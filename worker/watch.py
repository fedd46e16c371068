"""A background thread that keeps a claimed job's lease alive and notices cancel requests.

The engine only learns about cancellation through its progress callback, so the watch turns a
cancel request in the catalog into an Event the callback checks; it also writes progress at a
bounded rate so a fast-ticking converter does not hammer the database.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from quantyard import catalog
from quantyard.engine.errors import Cancelled

log = logging.getLogger(__name__)


@dataclass
class JobWatch:
    runtime: object  # WorkerRuntime; typed loosely to avoid an import cycle
    job_id: str
    lease_s: int
    min_write_interval_s: float = 1.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _last_write: float = 0.0
    _thread: threading.Thread | None = None

    def __enter__(self) -> "JobWatch":
        self._thread = threading.Thread(target=self._loop, name=f"watch-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        interval = max(self.lease_s / 3, 0.5)
        while not self._stop.wait(min(interval, 2.0)):
            try:
                self._renew_and_check()
            except Exception:  # the next tick retries; a dead DB shows up in the pipeline too
                log.exception("job watch tick failed for %s", self.job_id)

    def _renew_and_check(self) -> None:
        with self.runtime.session() as s:
            ok = catalog.renew_lease(
                s, job_id=self.job_id, worker_id=self.runtime.worker_id, lease_s=self.lease_s
            )
            job = catalog.get_job(s, job_id=self.job_id)
            s.commit()
        if not ok:
            self.lease_lost.set()
        if job is None or job.cancel_requested or job.status == "cancelled":
            self.cancelled.set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("the job was cancelled")
        if self.lease_lost.is_set():
            raise Cancelled("this worker lost the job's lease to another worker")

    def progress(self, fraction: float, message: str | None, *, target_id: str | None = None,
                 target_fraction: float | None = None, force: bool = False) -> None:
        """Record progress (rate-limited) and stop the work if a cancel came in."""
        self.raise_if_cancelled()
        now = time.monotonic()
        if not force and now - self._last_write < self.min_write_interval_s:
            return
        self._last_write = now
        with self.runtime.session() as s:
            stop = catalog.set_progress(
                s, job_id=self.job_id, progress=min(max(fraction, 0.0), 1.0), message=message,
                target_id=target_id, target_progress=target_fraction,
            )
            s.commit()
        if stop:
            self.cancelled.set()
            self.raise_if_cancelled()
