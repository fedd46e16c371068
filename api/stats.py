"""Read-only aggregates over the catalog used by /metrics and job waiting reasons.

(The catalog contract has no aggregate functions yet; these queries read its models directly.)
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from quantyard.catalog.models import Job

FINISHED = ("succeeded", "failed", "cancelled")


def jobs_by_hardware_class(s: Session) -> dict[str, int]:
    rows = s.execute(select(Job.hardware_class, func.count()).group_by(Job.hardware_class))
    return {hc: n for hc, n in rows}


def finished_by_outcome(s: Session) -> dict[str, int]:
    rows = s.execute(select(Job.status, func.count()).where(Job.status.in_(FINISHED)).group_by(Job.status))
    return {status: n for status, n in rows}


def running_by_hardware_class(s: Session, hardware_class: str | None = None) -> dict[str, int]:
    q = select(Job.hardware_class, func.count()).where(Job.status == "running")
    if hardware_class is not None:
        q = q.where(Job.hardware_class == hardware_class)
    return {hc: n for hc, n in s.execute(q.group_by(Job.hardware_class))}


def finished_durations(s: Session) -> list[tuple[str, float]]:
    """(outcome, seconds from start to finish) for finished jobs that ran."""
    rows = s.execute(
        select(Job.status, Job.started_at, Job.finished_at)
        .where(Job.status.in_(FINISHED), Job.started_at.is_not(None), Job.finished_at.is_not(None))
    )
    out = []
    for status, started, finished in rows:
        if isinstance(started, datetime) and isinstance(finished, datetime):
            out.append((status, max((finished - started).total_seconds(), 0.0)))
    return out
