"""What the reconciler needs from the catalog: the jobs and targets whose queue message may be
gone, worker capacity, the leader lock, and the audit and count of every re-send.

Job state lives here and the broker only carries messages, so anything the broker can lose
(Redis restarted without persistence, a whole worker killed while holding unacked messages, a
message acked by a worker that could not reach the catalog) is found by asking the catalog what
should be moving and is not. A re-send is always harmless: the claim (``claim_job`` /
``claim_target``) lets exactly one delivery do the work and turns the others into no-ops.

The four kinds of re-send (``RESEND_KINDS``):

- ``queued_job``: queued (prepare not started) for longer than the grace period;
- ``expired_job``: prepare stage running under an expired lease (its worker stopped renewing);
- ``pending_target``: a target of a dispatched job still pending a grace period after dispatch;
- ``expired_target``: a target running under an expired lease.

A queued job or pending target is re-sent only when no message for it waits in the broker's
queue (when the broker can be read: ``waiting`` below) and a live worker of its hardware class
has a free slot (otherwise its message is most likely just waiting behind busy workers). An
item is re-sent at most once per grace period (the last ``job.resend`` audit event says when).

Same transaction rule as the rest of the catalog: the caller commits.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import BigInteger, CursorResult, Engine, String, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Mapped, Session, lazyload, mapped_column

from .audit import record_audit
from .audit_seal import AUDIT_PENDING, EVENT_COLUMNS
from .models import AuditEvent, Base, Job, JobTarget, UTCDateTime, utcnow
from .workers import live_workers

RESEND_ACTION = "job.resend"
DISPATCH_ACTION = "job.dispatch"
RESEND_KINDS = ("queued_job", "expired_job", "pending_target", "expired_target")
# pg_try_advisory_xact_lock key: first 8 bytes of sha256("quantyard:reconciler") as a signed bigint.
LEADER_LOCK_KEY = int.from_bytes(hashlib.sha256(b"quantyard:reconciler").digest()[:8], "big", signed=True)
# Upper bound of items looked at per kind and pass (a backlog is worked off over several passes).
BATCH = 500
# The scans need the rows only, not each job's targets and artifacts (eager by default).
_ROWS_ONLY = lazyload("*")


class ReconcilerResend(Base):
    """How many messages the reconciler re-sent, per kind (read by /metrics)."""

    __tablename__ = "reconciler_resends"

    kind: Mapped[str] = mapped_column(String(50), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class Resend:
    """One message to send again: ``quantyard.convert_job(job_id)`` when ``target_id`` is None,
    else ``quantyard.convert_target`` with the target's recorded step: ``inputs`` is what
    ``mark_dispatched`` recorded for the job (``{"tasks": {target id: TargetTask dict}}``)."""

    kind: str
    job_id: str
    hardware_class: str
    organization_id: str | None
    target_id: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


# ---------------------------------------------------------------------------------- leader lock


_MEMORY_LOCK = threading.Lock()


@contextlib.contextmanager
def leader_lock(engine: Engine) -> Iterator[bool]:
    """Yields True in the one caller (across processes and hosts) that may reconcile now, False
    in every other one; never waits.

    Postgres: ``pg_try_advisory_xact_lock`` in a transaction of its own connection, held for the
    whole ``with`` block and released when it ends (or when the connection dies with its
    process). SQLite (one machine by construction): ``flock`` on ``<catalog>.reconcile.lock``
    beside the database file; an in-memory database: a lock of this process."""
    url = make_url(str(engine.url))
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"),
                                    {"key": LEADER_LOCK_KEY}).scalar())
            try:
                yield got
            finally:
                conn.rollback()
        return
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        got = _MEMORY_LOCK.acquire(blocking=False)
        try:
            yield got
        finally:
            if got:
                _MEMORY_LOCK.release()
        return
    path = Path(database).expanduser().resolve().with_suffix(".reconcile.lock")
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------- capacity


def worker_capacity(workers: Iterable[Any]) -> int:
    """Tasks the given workers run at once (each advertises "concurrency", default 1)."""
    total = 0
    for w in workers:
        caps = getattr(w, "capabilities", None) or {}
        try:
            total += max(int(caps.get("concurrency", 1)), 1)
        except (TypeError, ValueError):
            total += 1
    return total


def busy_slots(s: Session, *, hardware_class: str, now: datetime | None = None) -> int:
    """Tasks of a hardware class some worker is on right now: prepare stages and targets under
    a live lease. A job or target whose worker died (lease expired), or that is waiting for a
    message, keeps no worker busy."""
    now = now or utcnow()
    jobs = s.execute(select(func.count()).select_from(Job).where(
        Job.hardware_class == hardware_class, Job.status == "running", Job.dispatched_at.is_(None),
        Job.lease_expires_at > now)).scalar_one()
    targets = s.execute(select(func.count()).select_from(JobTarget).join(Job, JobTarget.job_id == Job.id).where(
        Job.hardware_class == hardware_class, JobTarget.status == "running",
        JobTarget.lease_expires_at > now)).scalar_one()
    return int(jobs) + int(targets)


@dataclass(frozen=True)
class Slots:
    live_workers: int
    capacity: int
    busy: int

    @property
    def free(self) -> int:
        return max(self.capacity - self.busy, 0)


def slots(s: Session, *, hardware_class: str, stale_after_s: float, now: datetime | None = None) -> Slots:
    """Live workers of a hardware class, the tasks they can run at once, and how many run now."""
    workers = live_workers(s, hardware_class=hardware_class, stale_after_s=stale_after_s)
    return Slots(len(workers), worker_capacity(workers), busy_slots(s, hardware_class=hardware_class, now=now))


# ------------------------------------------------------------------------------------ candidates


def _last_events(s: Session, job_ids: set[str], action: str) -> list[AuditEvent]:
    """The jobs' events of ``action``, oldest first: the chained ones, then those still pending
    (deferred chaining: committed but not sealed yet, and newer than every chained one)."""
    if not job_ids:
        return []
    ids = sorted(job_ids)
    q = (select(AuditEvent).where(AuditEvent.resource_type == "job", AuditEvent.resource_id.in_(ids),
                                  AuditEvent.action == action).order_by(AuditEvent.seq))
    events = list(s.execute(q).scalars())
    if s.get_bind().dialect.name == "postgresql":
        pending = (select(AUDIT_PENDING).where(AUDIT_PENDING.c.resource_type == "job",
                                               AUDIT_PENDING.c.resource_id.in_(ids), AUDIT_PENDING.c.action == action)
                   .order_by(AUDIT_PENDING.c.pending_seq))
        events += [AuditEvent(**{c: row[c] for c in EVENT_COLUMNS}) for row in s.execute(pending).mappings()]
    return events


def last_resends(s: Session, *, job_ids: set[str]) -> dict[tuple[str, str | None], datetime]:
    """When each (job id, target id or None) was last re-sent, from the audit chain."""
    out: dict[tuple[str, str | None], datetime] = {}
    for e in _last_events(s, job_ids, RESEND_ACTION):
        assert e.resource_id is not None  # selected by resource_id IN job_ids
        out[(e.resource_id, (e.details or {}).get("target_id"))] = e.at
    return out


def dispatch_inputs(s: Session, *, job_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The ``inputs`` each job's targets were dispatched with (the newest ``job.dispatch`` audit
    event records them; see ``mark_dispatched``)."""
    out: dict[str, dict[str, Any]] = {}
    for e in _last_events(s, job_ids, DISPATCH_ACTION):
        assert e.resource_id is not None  # selected by resource_id IN job_ids
        out[e.resource_id] = dict((e.details or {}).get("inputs") or {})
    return out


def _queued_jobs(s: Session, now: datetime, grace: timedelta) -> list[tuple[str, Job, None]]:
    q = (select(Job).options(_ROWS_ONLY)
         .where(Job.status == "queued", Job.dispatched_at.is_(None), Job.created_at < now - grace)
         .order_by(Job.created_at).limit(BATCH))
    return [("queued_job", j, None) for j in s.execute(q).scalars()]


def _expired_jobs(s: Session, now: datetime) -> list[tuple[str, Job, None]]:
    q = (select(Job).options(_ROWS_ONLY)
         .where(Job.status == "running", Job.dispatched_at.is_(None), Job.cancel_requested.is_(False),
                           Job.lease_expires_at < now).order_by(Job.lease_expires_at).limit(BATCH))
    return [("expired_job", j, None) for j in s.execute(q).scalars()]


def _targets(s: Session, now: datetime, grace: timedelta) -> list[tuple[str, Job, JobTarget]]:
    running_job = (Job.status == "running", Job.dispatched_at.is_not(None), Job.cancel_requested.is_(False))
    pending = (select(JobTarget, Job).options(_ROWS_ONLY).join(Job, JobTarget.job_id == Job.id)
               .where(*running_job, JobTarget.status == "pending", Job.dispatched_at < now - grace)
               .order_by(Job.dispatched_at).limit(BATCH))
    expired = (select(JobTarget, Job).options(_ROWS_ONLY).join(Job, JobTarget.job_id == Job.id)
               .where(*running_job, JobTarget.status == "running", JobTarget.lease_expires_at < now)
               .order_by(JobTarget.lease_expires_at).limit(BATCH))
    return ([("pending_target", j, t) for t, j in s.execute(pending)]
            + [("expired_target", j, t) for t, j in s.execute(expired)])


def find_lost(s: Session, *, grace_s: float, stale_after_s: float, waiting: set[str] | None,
              expired: bool = True, now: datetime | None = None) -> list[Resend]:
    """The messages to send again now (see the module docstring for the rules).

    ``waiting``: ids of the jobs (convert_job) and targets (convert_target) whose message waits
    in the broker's queues, None when the broker cannot be read. ``expired=False`` leaves out
    the expired-lease kinds (right after a catalog outage, live workers first get a chance to
    renew the leases they could not renew meanwhile)."""
    now = now or utcnow()
    grace = timedelta(seconds=grace_s)
    found = _queued_jobs(s, now, grace) + _targets(s, now, grace) + _expired_jobs(s, now)
    if not expired:
        found = [f for f in found if not f[0].startswith("expired")]
    last = last_resends(s, job_ids={j.id for _, j, _ in found})
    inputs = dispatch_inputs(s, job_ids={j.id for _, j, t in found if t is not None})
    free: dict[str, int] = {}
    out = []
    for kind, job, target in found:
        item_id = target.id if target is not None else job.id
        sent = last.get((job.id, target.id if target is not None else None))
        if waiting is not None and item_id in waiting:
            continue  # a message for it is in the queue: nothing is lost
        if sent is not None and now - sent < grace:
            continue  # re-sent recently: give that message time
        if kind.startswith("expired"):
            expired_at = (target or job).lease_expires_at
            assert expired_at is not None  # the expired kinds are selected by lease_expires_at < now
            reason = f"its lease expired at {expired_at.isoformat()} (worker {(target or job).worker_id} stopped)"
        else:
            if job.hardware_class not in free:
                free[job.hardware_class] = slots(s, hardware_class=job.hardware_class,
                                                 stale_after_s=stale_after_s, now=now).free
            if free[job.hardware_class] <= 0:
                continue  # every live worker is busy: its message most likely waits behind them
            reason = ("queued" if target is None else "pending since dispatch") + \
                f" for over {grace_s:g} s with no message in the queue and a worker free"
        out.append(Resend(kind=kind, job_id=job.id, hardware_class=job.hardware_class,
                          organization_id=job.organization_id, target_id=target.id if target is not None else None,
                          inputs=inputs.get(job.id, {}) if target is not None else {}, reason=reason))
    return out


def jobs_to_settle(s: Session, *, now: datetime | None = None) -> list[str]:
    """Running jobs that need no message to end, only settling (``targets.close_abandoned``):
    a cancel was asked for and the prepare stage's lease expired or the targets were dispatched;
    or every target of a dispatched job has finished and the job was not settled."""
    now = now or utcnow()
    unfinished = (select(JobTarget.id).where(JobTarget.job_id == Job.id,
                                             JobTarget.status.in_(("pending", "running"))).exists())
    q = (select(Job.id).where(Job.status == "running").where(
        (Job.cancel_requested.is_(True) & (Job.dispatched_at.is_not(None) | (Job.lease_expires_at < now)))
        | (Job.dispatched_at.is_not(None) & ~unfinished)).limit(BATCH))
    return list(s.execute(q).scalars())


# ---------------------------------------------------------------------------- record re-sends


def record_resends(s: Session, *, resends: Iterable[Resend], actor: str) -> int:
    """Audit each re-send (``job.resend`` on the job, details: kind, target_id, reason) and add
    it to the per-kind counter; returns how many were recorded."""
    counts: dict[str, int] = {}
    now = utcnow()
    for r in resends:
        record_audit(s, actor=actor, action=RESEND_ACTION, resource_type="job", resource_id=r.job_id,
                     organization_id=r.organization_id,
                     details={"kind": r.kind, "target_id": r.target_id, "reason": r.reason})
        counts[r.kind] = counts.get(r.kind, 0) + 1
    for kind, n in counts.items():
        changed = cast(CursorResult, s.execute(update(ReconcilerResend).where(ReconcilerResend.kind == kind)
                                               .values(count=ReconcilerResend.count + n, last_at=now))).rowcount
        if not changed:
            s.add(ReconcilerResend(kind=kind, count=n, last_at=now))
        s.flush()
    return sum(counts.values())


def resend_counts(s: Session) -> dict[str, int]:
    """Re-sends so far, per kind (every kind present, zero when none)."""
    counts = {kind: 0 for kind in RESEND_KINDS}
    for kind, n in s.execute(select(ReconcilerResend.kind, ReconcilerResend.count)):
        counts[kind] = int(n)
    return counts


__all__ = [
    "BATCH", "DISPATCH_ACTION", "LEADER_LOCK_KEY", "RESEND_ACTION", "RESEND_KINDS", "ReconcilerResend", "Resend",
    "Slots", "busy_slots", "dispatch_inputs", "find_lost", "jobs_to_settle", "last_resends", "leader_lock", "record_resends",
    "resend_counts", "slots", "worker_capacity",
]
