"""Jobs and their targets: creation, listing, cancellation, claiming by workers, progress."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, String, Table, TextClause, bindparam, func, insert, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from .audit import RequestInfo, audit_refused, pending_event, record_audit
from .audit_seal import AUDIT_PENDING, PENDING_FLAG, is_deferred
from .errors import InvalidArgument, NotFound
from .models import (
    JOB_STATUSES,
    TARGET_STATUSES,
    TERMINAL_JOB_STATUSES,
    TERMINAL_TARGET_STATUSES,
    Job,
    JobTarget,
    Source,
    new_id,
    utcnow,
)
from .pagination import paginate

CLAIM_KINDS = ("claimed", "gone", "finished", "cancelled", "exhausted", "leased", "dispatched")


@dataclass
class ClaimOutcome:
    """``kind``: claimed | gone | finished | cancelled | exhausted | leased | dispatched (a job
    whose targets already run as tasks of their own).

    ``leased``: another worker holds an unexpired lease; ``retry_after_s`` says when it runs out."""

    kind: str
    job: Job | None = None
    attempt: int = 0
    retry_after_s: float | None = None

    @property
    def claimed(self) -> bool:
        return self.kind == "claimed"


def _worker_actor(worker_id: str | None) -> str:
    return f"worker:{worker_id}" if worker_id else "system"


def _clamp01(value: float) -> float:
    return max(0.0, min(1.0, float(value)))


def _lock_job(s: Session, job_id: str) -> Job | None:
    """Load a job fresh from the database; on Postgres its row stays locked until the tx ends."""
    q = select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
    return s.execute(q).scalars().first()


def _target_dict(t: Any) -> dict[str, Any]:
    if hasattr(t, "to_dict") and not isinstance(t, Mapping):
        t = t.to_dict()
    if isinstance(t, str):
        fmt, _, quant = t.partition(":")
        t = {"format": fmt, "quantization": quant}
    if not isinstance(t, Mapping) or not t.get("format") or not t.get("quantization"):
        raise InvalidArgument(f"a target needs a format and a quantization, got {t!r}")
    return {"format": str(t["format"]), "quantization": str(t["quantization"]), "params": dict(t.get("params") or {})}


# ---------------------------------------------------------------------------------------- create


@dataclass(frozen=True)
class SourceFacts:
    """What a submission needs of its source that never changes once it is uploaded: its id, its
    organisation and its metadata (the kind of source). Whether it still exists and is not
    withdrawn is checked by the job's INSERT itself (see :func:`create_job`), so an API process
    may remember these between requests."""

    id: str
    organization_id: str | None
    meta: Mapping[str, Any]

    @classmethod
    def of(cls, source: Source) -> SourceFacts:
        return cls(id=source.id, organization_id=source.organization_id, meta=dict(source.meta or {}))


class SourceChanged(NotFound):
    """The source given as :class:`SourceFacts` is gone or withdrawn now: nothing was written."""


def create_job(
    s: Session,
    *,
    source_id: str,
    targets: list[Any],
    hardware_class: str = "cpu",
    labels: Mapping[str, Any] | None = None,
    actor: str,
    request: RequestInfo | None = None,
    max_attempts: int = 3,
    warnings: list[Any] | None = None,
    organization_id: str | None = None,
    source: SourceFacts | None = None,
) -> Job:
    """A queued job with one pending JobTarget per entry of ``targets`` (dicts as
    ``TargetSpec.to_dict()`` gives, TargetSpec objects, or "format:quantization" strings).

    ``organization_id``: the caller's tenant (default: from ``request``, else the source's); a
    source of another organisation is NotFound.

    ``source``: the source's facts as the caller already knows them (it did not check them
    again): the job is made only if the source still exists in that organisation and is not
    withdrawn, else :class:`SourceChanged` (nothing written). With deferred chaining the source
    is then not read at all: the INSERT checks it."""
    if organization_id is None and request is not None:
        organization_id = request.organization_id
    guarded = source is not None and source.id == source_id and is_deferred(s)
    if not guarded:
        found = s.get(Source, source_id)
        if source is not None and (found is None or found.withdrawn_at is not None or (
                organization_id is not None and found.organization_id != organization_id)):
            raise SourceChanged(f"source {source_id} not found or withdrawn")  # as the guarded INSERT would
        source = SourceFacts.of(found) if found is not None else None
    if source is None or (organization_id is not None and source.organization_id != organization_id):
        raise NotFound(f"source {source_id} not found")
    specs = [_target_dict(t) for t in targets]
    if not specs:
        raise InvalidArgument("a job needs at least one target")
    job = Job(**_new_job_row(source_id=source_id, hardware_class=hardware_class, labels=labels,
                             max_attempts=max_attempts, warnings=warnings, actor=actor,
                             organization_id=organization_id if organization_id is not None else source.organization_id))
    job_targets = [JobTarget(**_new_target_row(job.id, i, spec)) for i, spec in enumerate(specs)]
    audit = dict(actor=actor, action="job.create", resource_type="job", resource_id=job.id,
                 organization_id=job.organization_id, request=request,
                 details={"source_id": source_id, "targets": [t.key for t in job_targets],
                          "hardware_class": hardware_class, "labels": job.labels})
    _insert_job(s, job, job_targets, audit, guarded=guarded)
    return job


def _new_job_row(*, source_id: str, hardware_class: str, labels: Mapping[str, Any] | None, max_attempts: int,
                 warnings: list[Any] | None, actor: str, organization_id: str | None) -> dict[str, Any]:
    """Every column of a new job (none left to defaults: the object is not read back)."""
    return dict(id=new_id("job"), organization_id=organization_id, source_id=source_id, status="queued", progress=0.0,
                progress_message=None, hardware_class=hardware_class,
                labels={str(k): str(v) for k, v in (labels or {}).items()}, attempts=0, max_attempts=max_attempts,
                lease_expires_at=None, worker_id=None, cancel_requested=False, error_code=None, error_message=None,
                warnings=list(warnings or []), created_by=actor, created_at=utcnow(), started_at=None,
                finished_at=None, dispatched_at=None)


def _new_target_row(job_id: str, position: int, spec: dict[str, Any]) -> dict[str, Any]:
    return dict(id=new_id("tgt"), job_id=job_id, position=position, status="pending", progress=0.0, estimate=None,
                error_code=None, error_message=None, artifact_id=None, attempts=0, lease_expires_at=None,
                worker_id=None, started_at=None, finished_at=None, reused=False, reused_from_job=None, **spec)


def _row(obj: Any) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row for ``jsonb_populate_record``: times as ISO 8601 (microseconds and offset kept)."""
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _insert_job(s: Session, job: Job, targets: list[JobTarget], audit: dict[str, Any], *, guarded: bool) -> None:
    """INSERT the job, its targets and its audit event, then make the objects persistent as they
    are (no flush, no read-back): a submission is the API's hottest write.

    Deferred chaining (Postgres): one statement (:func:`_create_statement`), one round trip, all or
    nothing. Otherwise the rows, then ``record_audit``."""
    s.flush()  # whatever the session holds goes first, as an ORM flush would order it
    if is_deferred(s):
        params: dict[str, Any] = {"job": _json_row(_row(job)), "targets": [_json_row(_row(t)) for t in targets],
                                  "event": _json_row(pending_event(**audit))}
        if guarded:
            params.update(source_id=job.source_id, organization_id=job.organization_id)
        try:
            inserted = s.execute(_create_statement(guarded), params).first()
        except (IntegrityError, OperationalError):
            raise  # the job's own rows (or the connection): not the audit record's fault
        except DBAPIError as exc:  # the audit record was refused: fail closed, nothing was written
            raise audit_refused("job.create", "job", job.id, exc) from exc
        if inserted is None:
            raise SourceChanged(f"source {job.source_id} not found or withdrawn")
        s.info[PENDING_FLAG] = True
    else:
        s.execute(insert(cast(Table, Job.__table__)), [_row(job)])
        s.execute(insert(cast(Table, JobTarget.__table__)), [_row(t) for t in targets])
        record_audit(s, **audit)
    for obj in (job, *targets):
        make_transient_to_detached(obj)
    set_committed_value(job, "targets", targets)
    set_committed_value(job, "artifacts", [])  # a new job has none
    for t in targets:
        set_committed_value(t, "job", job)
    s.add(job)  # cascades to the targets: persistent, nothing pending


@functools.cache
def _create_statement(guarded: bool) -> TextClause:
    """The job, its targets and its pending audit event in one Postgres statement: the job and the
    targets are data-modifying CTEs of the audit_pending INSERT (the targets' foreign key is
    checked at the end of the statement, when the job exists). Rows travel as JSONB and are typed
    by their tables (``jsonb_populate_record[set]``), so the statement is the same for any number
    of targets and compiled once. ``guarded``: the job is inserted only if its source exists in
    its organisation and is not withdrawn; the targets and the event only with the job, and the
    statement returns a row only when it inserted."""
    def cols(table: Table, prefix: str = "") -> str:
        return ", ".join(prefix + c.name for c in table.columns if c.name != "pending_seq")

    jobs, targets = cast(Table, Job.__table__), cast(Table, JobTarget.__table__)
    guard = ("WHERE EXISTS (SELECT 1 FROM sources WHERE sources.id = :source_id AND sources.withdrawn_at IS NULL "
             "AND sources.organization_id IS NOT DISTINCT FROM :organization_id) " if guarded else "")
    sql = (f"WITH new_job AS (INSERT INTO jobs ({cols(jobs)}) SELECT {cols(jobs, 'j.')} "
           f"FROM jsonb_populate_record(NULL::jobs, :job) AS j {guard}RETURNING id), "
           f"new_targets AS (INSERT INTO job_targets ({cols(targets)}) SELECT {cols(targets, 't.')} "
           f"FROM new_job, jsonb_populate_recordset(NULL::job_targets, :targets) AS t) "
           f"INSERT INTO audit_pending ({cols(AUDIT_PENDING)}) SELECT {cols(AUDIT_PENDING, 'e.')} "
           f"FROM new_job, jsonb_populate_record(NULL::audit_pending, :event) AS e RETURNING pending_seq")
    binds = [bindparam(name, type_=postgresql.JSONB()) for name in ("job", "targets", "event")]
    if guarded:
        binds += [bindparam("source_id", type_=String()), bindparam("organization_id", type_=String())]
    return text(sql).bindparams(*binds)


# ------------------------------------------------------------------------------------------ read


def get_job(s: Session, *, job_id: str, organization_id: str | None = None) -> Job | None:
    job = s.get(Job, job_id)
    if job is None or (organization_id is not None and job.organization_id != organization_id):
        return None
    return job


def _parse_labels(label: str | Iterable[str] | Mapping[str, Any] | None) -> dict[str, str]:
    if label is None:
        return {}
    if isinstance(label, Mapping):
        return {str(k): str(v) for k, v in label.items()}
    items = [label] if isinstance(label, str) else list(label)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"label filter must be key=value, got {item!r}")
        out[key] = value
    return out


def list_jobs(
    s: Session,
    *,
    status: str | Iterable[str] | None = None,
    label: str | Iterable[str] | Mapping[str, Any] | None = None,
    limit: int = 50,
    cursor: str | None = None,
    hardware_class: str | None = None,
    source_id: str | None = None,
    organization_id: str | None = None,
) -> tuple[list[Job], str | None]:
    """Newest first. ``label`` is "key=value" (or several; all must match)."""
    q = select(Job)
    if organization_id is not None:
        q = q.where(Job.organization_id == organization_id)
    if status:
        statuses = [status] if isinstance(status, str) else list(status)
        bad = [x for x in statuses if x not in JOB_STATUSES]
        if bad:
            raise InvalidArgument(f"unknown job status {bad[0]!r}; valid: {', '.join(JOB_STATUSES)}")
        q = q.where(Job.status.in_(statuses))
    for key, value in _parse_labels(label).items():
        q = q.where(Job.labels[key].as_string() == value)
    if hardware_class:
        q = q.where(Job.hardware_class == hardware_class)
    if source_id:
        q = q.where(Job.source_id == source_id)
    return paginate(s, q, Job, limit=limit, cursor=cursor)


def queue_depth(s: Session) -> dict[str, int]:
    rows = s.execute(
        select(Job.hardware_class, func.count()).where(Job.status == "queued").group_by(Job.hardware_class)
    )
    return {hw: int(n) for hw, n in rows}


# -------------------------------------------------------------------------------------- mutate


def _close_targets(job: Job, status: str, error_code: str | None = None, error_message: str | None = None) -> None:
    """Every unfinished target ends with the job: ``failed`` with the job's cause when the job
    failed (e.g. its prepare stage), ``cancelled`` when it was cancelled."""
    now = utcnow()
    for t in job.targets:
        if t.status in TERMINAL_TARGET_STATUSES:
            continue
        t.status = status
        t.lease_expires_at = None
        t.finished_at = now
        if status == "failed":
            t.error_code, t.error_message = error_code, error_message
        else:
            t.error_code = t.error_message = None


def _finish(job: Job, status: str, error_code: str | None, error_message: str | None) -> None:
    job.status = status
    job.finished_at = utcnow()
    job.lease_expires_at = None
    job.error_code, job.error_message = error_code, error_message
    job.progress_message = status  # the last step's message would read as if it were running
    if status == "succeeded":
        job.progress = 1.0
    if status in ("failed", "cancelled"):
        _close_targets(job, status, error_code, error_message)


def request_cancel(s: Session, *, job_id: str, actor: str, request: RequestInfo | None = None,
                   organization_id: str | None = None) -> Job:
    """Queued: cancelled at once. Running: ``cancel_requested``, and whatever no live worker
    holds ends now (``targets.close_abandoned``: a prepare stage whose lease expired, pending
    targets, targets under an expired lease), so the job is ``cancelled`` at once when nobody
    runs it; the targets a worker holds stop cooperatively (an artifact is recorded only if its
    worker saw no cancel: ``targets.hold_for_record``), and the reconciler settles them if that
    worker dies. A dispatched job whose targets have all finished is settled instead (it ends
    ``succeeded``/``failed``: too late to cancel). Finished: unchanged (the audit event records
    outcome ``noop``). A job of another organisation than ``organization_id`` is NotFound."""
    from .targets import close_abandoned  # targets.py builds on this module

    job = _lock_job(s, job_id)
    if job is None or (organization_id is not None and job.organization_id != organization_id):
        raise NotFound(f"job {job_id} not found")
    previous = job.status
    outcome = "success"
    finishing = job.status == "running" and job.dispatched_at is not None and all(
        t.status in TERMINAL_TARGET_STATUSES for t in job.targets)
    if job.status == "queued":
        job.cancel_requested = True
        _finish(job, "cancelled", None, None)
    elif job.status == "running" and not finishing:
        job.cancel_requested = True
    else:
        outcome = "noop"
    s.flush()
    if job.status == "running":
        close_abandoned(s, job_id=job.id, actor=actor)
        s.refresh(job)
    record_audit(
        s,
        actor=actor,
        action="job.cancel",
        resource_type="job",
        resource_id=job.id, organization_id=job.organization_id,
        outcome=outcome,
        request=request,
        details={"from": previous, "to": job.status},
    )
    return job


def claim_job(s: Session, *, job_id: str, worker_id: str, lease_s: float, max_attempts: int) -> ClaimOutcome:
    """Take the job for ``worker_id``. Exactly one of several concurrent claimers wins: the row is
    locked (Postgres ``FOR UPDATE``) and the change is a conditional UPDATE on (status, attempts),
    which is what makes it atomic on SQLite. A running job whose lease has expired (its worker
    died) can be claimed again; when ``attempts >= max_attempts`` it is failed instead
    (``attempts_exhausted``). Commit promptly: on Postgres the row lock lasts until then."""
    job: Job | None = None
    for _ in range(5):
        now = utcnow()
        job = _lock_job(s, job_id)
        if job is None:
            return ClaimOutcome("gone")
        if job.status in ("succeeded", "failed"):
            return ClaimOutcome("finished", job, job.attempts)
        if job.status == "cancelled":
            return ClaimOutcome("cancelled", job, job.attempts)
        if job.dispatched_at is not None:
            return ClaimOutcome("dispatched", job, job.attempts)  # its targets run on their own
        if job.status == "running" and job.lease_expires_at is not None and job.lease_expires_at > now:
            return ClaimOutcome("leased", job, job.attempts, (job.lease_expires_at - now).total_seconds())
        # Queued, or running under an expired lease (the worker that held it is gone).
        actor = _worker_actor(worker_id)
        if job.cancel_requested:
            _finish(job, "cancelled", None, None)
            s.flush()
            record_audit(s, actor=actor, action="job.finish", resource_type="job", resource_id=job.id,
                         organization_id=job.organization_id,
                         outcome="cancelled", details={"reason": "cancel requested before redelivery"})
            return ClaimOutcome("cancelled", job, job.attempts)
        if job.attempts >= max_attempts:
            message = exhausted_message(job.attempts, max_attempts, _last_cause(job, now))
            _finish(job, "failed", "attempts_exhausted", message)
            s.flush()
            record_audit(s, actor=actor, action="job.finish", resource_type="job", resource_id=job.id,
                         organization_id=job.organization_id,
                         outcome="failed", details={"error_code": "attempts_exhausted", "attempts": job.attempts})
            return ClaimOutcome("exhausted", job, job.attempts)
        previous_status, seen_attempts, previous_worker = job.status, job.attempts, job.worker_id
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == previous_status, Job.attempts == seen_attempts)
            .values(
                status="running",
                attempts=seen_attempts + 1,
                max_attempts=max_attempts,
                worker_id=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_s),
                started_at=job.started_at or now,
                error_code=None,
                error_message=None,
            )
        )
        if cast(CursorResult, result).rowcount != 1:
            continue  # another claimer changed the row between our read and our update: re-read
        # Targets a dead worker left running start again; finished targets stay finished.
        for t in job.targets:
            if t.status == "running":
                t.status, t.progress = "pending", 0.0
        s.flush()
        record_audit(
            s,
            actor=actor,
            action="job.claim",
            resource_type="job",
            resource_id=job.id, organization_id=job.organization_id,
            details={"attempt": seen_attempts + 1, "redelivery": previous_status == "running",
                     "previous_worker": previous_worker},
        )
        return ClaimOutcome("claimed", job, job.attempts)
    return ClaimOutcome("leased", job, job.attempts if job else 0)


def exhausted_message(attempts: int, max_attempts: int, cause: str | None) -> str:
    """The error message of ``attempts_exhausted``, with the last attempt's cause when known."""
    message = f"gave up after {attempts} attempt(s) (max_attempts={max_attempts})"
    return f"{message}; the last attempt: {cause}" if cause else message


def _last_cause(item: Job | JobTarget, now) -> str | None:
    """Why the previous attempt of a job or target ended without a result: what was noted for it
    (``note_lost_attempt``), else an expired lease's worker."""
    if item.error_message:
        return item.error_message
    if item.status == "running" and item.lease_expires_at is not None and item.lease_expires_at <= now:
        return lease_expired_cause(item.worker_id, item.lease_expires_at)
    return None


def lease_expired_cause(worker_id: str | None, expired_at) -> str:
    return (f"worker {worker_id} stopped renewing its lease (expired {expired_at.isoformat()}): "
            "it was killed, ran out of memory or lost the catalog")


def note_lost_attempt(s: Session, *, job_id: str, target_id: str | None = None, cause: str,
                      worker_id: str | None = None) -> bool:
    """Remember why the running attempt of a job's prepare stage (or of one target) ended without
    a result, e.g. its worker process died: shown as the job's or target's error while it waits
    to be redone, and in ``attempts_exhausted`` if it never is. With ``worker_id`` (the worker
    that knows its process died), only that worker's attempt is noted and its lease ends now, so
    the requeued message re-claims it at once instead of waiting out the lease. Not audited (the
    claim that redoes it is). False when the job or target is no longer running (or not held by
    ``worker_id``)."""
    model = Job if target_id is None else JobTarget
    if target_id is None:
        q = update(Job).where(Job.id == job_id, Job.status == "running", Job.dispatched_at.is_(None))
    else:
        q = update(JobTarget).where(JobTarget.id == target_id, JobTarget.job_id == job_id,
                                    JobTarget.status == "running")
    values: dict[str, Any] = {"error_code": "worker_lost", "error_message": cause}
    if worker_id is not None:
        q = q.where(model.worker_id == worker_id)
        values["lease_expires_at"] = utcnow()
    return cast(CursorResult, s.execute(q.values(**values))).rowcount == 1


def renew_lease(s: Session, *, job_id: str, worker_id: str, lease_s: float) -> bool:
    """Extend the lease; False when this worker no longer holds the job."""
    result = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
    )
    return cast(CursorResult, result).rowcount == 1


def set_progress(
    s: Session,
    *,
    job_id: str,
    progress: float,
    message: str | None = None,
    target_id: str | None = None,
    target_progress: float | None = None,
) -> bool:
    """Record progress (clamped to 0..1; not audited). Returns True when the job should stop:
    a cancel was requested or it is already cancelled."""
    values: dict[str, Any] = {"progress": _clamp01(progress)}
    if message is not None:
        values["progress_message"] = message
    s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL_JOB_STATUSES)).values(**values))
    if target_id is not None and target_progress is not None:
        s.execute(
            update(JobTarget)
            .where(JobTarget.id == target_id, JobTarget.job_id == job_id)
            .values(progress=_clamp01(target_progress))
        )
    row = s.execute(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).first()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return bool(row.cancel_requested) or row.status == "cancelled"


def set_target_status(
    s: Session,
    *,
    target_id: str,
    status: str,
    error_code: str | None = None,
    error_message: str | None = None,
    estimate: dict[str, Any] | None = None,
    progress: float | None = None,
    actor: str | None = None,
) -> JobTarget:
    """Set one target's status (audited when it changes); ``estimate`` is stored when given."""
    if status not in TARGET_STATUSES:
        raise InvalidArgument(f"unknown target status {status!r}; valid: {', '.join(TARGET_STATUSES)}")
    target = s.get(JobTarget, target_id)
    if target is None:
        raise NotFound(f"target {target_id} not found")
    previous = target.status
    target.status = status
    target.error_code, target.error_message = error_code, error_message
    if estimate is not None:
        target.estimate = dict(estimate)
    if progress is not None:
        target.progress = _clamp01(progress)
    elif status == "succeeded":
        target.progress = 1.0
    s.flush()
    if previous != status:
        job = s.get(Job, target.job_id)
        record_audit(
            s,
            actor=actor or _worker_actor(job.worker_id if job else None),
            action="job.target_status",
            resource_type="job",
            resource_id=target.job_id,
            organization_id=job.organization_id if job else None,
            outcome="failed" if status == "failed" else "success",
            details={"target_id": target.id, "target": target.key, "from": previous, "to": status,
                     "error_code": error_code},
        )
    return target


def finish_job(
    s: Session,
    *,
    job_id: str,
    status: str,
    error_code: str | None = None,
    error_message: str | None = None,
    actor: str | None = None,
    warnings: list[Any] | None = None,
) -> Job:
    """Move a job to succeeded | failed | cancelled. A job that is already finished is returned
    unchanged (redelivered tasks may finish twice)."""
    if status not in TERMINAL_JOB_STATUSES:
        raise InvalidArgument(f"finish_job status must be one of {sorted(TERMINAL_JOB_STATUSES)}, got {status!r}")
    job = _lock_job(s, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    if job.is_terminal:
        return job
    _finish(job, status, error_code, error_message)
    if warnings:
        job.warnings = list(job.warnings or []) + list(warnings)
    s.flush()
    record_audit(
        s,
        actor=actor or _worker_actor(job.worker_id),
        action="job.finish",
        resource_type="job",
        resource_id=job.id, organization_id=job.organization_id,
        outcome=status,
        details={"error_code": error_code, "attempts": job.attempts},
    )
    return job
