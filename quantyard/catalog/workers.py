"""Worker registry: heartbeats prove a worker's consumer loop is alive."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Worker, utcnow


def worker_heartbeat(
    s: Session, *, worker_id: str, hostname: str, hardware_class: str, capabilities: dict[str, Any]
) -> None:
    """Insert or refresh the worker's row (telemetry: not audited)."""
    now = utcnow()
    worker = s.get(Worker, worker_id)
    if worker is None:
        s.add(Worker(id=worker_id, hostname=hostname, hardware_class=hardware_class,
                     capabilities=dict(capabilities or {}), started_at=now, last_heartbeat_at=now))
    else:
        worker.hostname = hostname
        worker.hardware_class = hardware_class
        worker.capabilities = dict(capabilities or {})
        worker.last_heartbeat_at = now
    s.flush()


def live_workers(s: Session, *, hardware_class: str | None = None, stale_after_s: float) -> list[Worker]:
    """Workers whose last heartbeat is younger than ``stale_after_s``."""
    q = select(Worker).where(Worker.last_heartbeat_at >= utcnow() - timedelta(seconds=stale_after_s))
    if hardware_class:
        q = q.where(Worker.hardware_class == hardware_class)
    return list(s.execute(q.order_by(Worker.hardware_class, Worker.id)).scalars())


def worker_stopped(s: Session, *, worker_id: str) -> None:
    """Forget a worker that shut down cleanly, so it stops counting as live at once."""
    worker = s.get(Worker, worker_id)
    if worker is not None:
        s.delete(worker)
        s.flush()
