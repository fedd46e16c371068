"""Targets as tasks of their own: once a job's shared work is done (source fetched, lossless
intermediate made), each target is claimed, leased and finished independently, so targets of
one job run in parallel on several workers. The job settles when its last target does.

Same transaction rule as the rest of the catalog: the caller commits.
"""

from __future__ import annotations

from datetime import timedelta
from typing import cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from .audit import record_audit
from .errors import NotFound
from .jobs import ClaimOutcome, _finish, _last_cause, _lock_job, _worker_actor, exhausted_message
from .models import TERMINAL_JOB_STATUSES, Job, JobTarget, utcnow

TERMINAL_TARGET_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# Share of a job's progress bar taken by the shared work before targets are dispatched.
PREPARE_SHARE = 0.3


def add_job_warning(s: Session, *, job_id: str, code: str, message: str) -> None:
    """Something the user should know about a job that still runs (e.g. requantizing)."""
    job = _lock_job(s, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    job.warnings = list(job.warnings or []) + [{"code": code, "message": message}]
    s.flush()


def mark_dispatched(s: Session, *, job_id: str, message: str, inputs: dict | None = None) -> Job:
    """The preparing task is done: targets now carry the job; the job lease is no longer used.
    ``inputs`` (what the target tasks are sent: ``{"tasks": {target id: TargetTask as a dict}}``,
    each target's serialised step of the conversion plan, quantyard/engine/plan.py) is kept in
    the ``job.dispatch`` audit event, from which the reconciler re-sends a lost target."""
    job = _lock_job(s, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    job.dispatched_at = utcnow()
    job.lease_expires_at = None
    job.progress = max(job.progress, PREPARE_SHARE)
    job.progress_message = message
    s.flush()
    record_audit(s, actor=_worker_actor(job.worker_id), action="job.dispatch", resource_type="job",
                 resource_id=job.id, organization_id=job.organization_id,
                 details={"targets": [t.id for t in job.targets if t.status == "pending"],
                          "inputs": dict(inputs or {})})
    return job


def _lock_target(s: Session, target_id: str) -> JobTarget | None:
    q = (select(JobTarget).where(JobTarget.id == target_id).with_for_update()
         .execution_options(populate_existing=True))
    return s.execute(q).scalars().first()


def claim_target(s: Session, *, target_id: str, worker_id: str, lease_s: float,
                 max_attempts: int) -> ClaimOutcome:
    """Like ``claim_job``, for one target (the job's row is locked first, then the target's, the
    same order everywhere, so claims and settling never deadlock)."""
    target = s.get(JobTarget, target_id)
    if target is None:
        return ClaimOutcome("gone")
    job = _lock_job(s, target.job_id)
    target = _lock_target(s, target_id)
    # Both rows were just read in this transaction and nothing deletes jobs or targets.
    assert job is not None and target is not None
    now = utcnow()
    if target.status in TERMINAL_TARGET_STATUSES:
        return ClaimOutcome("finished", job, target.attempts)
    if job.status in TERMINAL_JOB_STATUSES or job.cancel_requested:
        _close_target(target, "cancelled", None, None)
        s.flush()
        settle_job(s, job_id=job.id)
        return ClaimOutcome("cancelled", job, target.attempts)
    if target.status == "running" and target.lease_expires_at and target.lease_expires_at > now:
        return ClaimOutcome("leased", job, target.attempts,
                            (target.lease_expires_at - now).total_seconds())
    if target.attempts >= max_attempts:
        _close_target(target, "failed", "attempts_exhausted",
                      exhausted_message(target.attempts, max_attempts, _last_cause(target, now)))
        s.flush()
        settle_job(s, job_id=job.id)
        return ClaimOutcome("exhausted", job, target.attempts)
    redelivery = target.status == "running"
    target.status, target.progress = "running", 0.0
    target.attempts += 1
    target.worker_id = worker_id
    target.lease_expires_at = now + timedelta(seconds=lease_s)
    target.started_at = target.started_at or now
    target.error_code = target.error_message = None  # a lost attempt's cause, now being redone
    s.flush()
    record_audit(s, actor=_worker_actor(worker_id), action="target.claim", resource_type="job",
                 resource_id=job.id, organization_id=job.organization_id,
                 details={"target_id": target.id, "attempt": target.attempts, "redelivery": redelivery})
    return ClaimOutcome("claimed", job, target.attempts)


def renew_target_lease(s: Session, *, target_id: str, worker_id: str, lease_s: float) -> bool:
    result = cast(CursorResult, s.execute(
        update(JobTarget)
        .where(JobTarget.id == target_id, JobTarget.worker_id == worker_id,
               JobTarget.status == "running")
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
    ))
    return result.rowcount == 1


def set_target_progress(s: Session, *, target_id: str, progress: float,
                        message: str | None = None) -> bool:
    """Record a target's progress and fold it into its job's; True when the work should stop."""
    target = s.get(JobTarget, target_id)
    if target is None:
        raise NotFound(f"target {target_id} not found")
    s.execute(update(JobTarget).where(JobTarget.id == target_id, JobTarget.status == "running")
              .values(progress=min(max(progress, 0.0), 1.0)))
    s.refresh(target)
    job = s.get(Job, target.job_id)
    assert job is not None  # job_id is a foreign key and nothing deletes jobs
    s.refresh(job)
    if job.status not in TERMINAL_JOB_STATUSES:
        job.progress = max(job.progress, _job_progress(job))
        if message is not None:
            job.progress_message = f"{target.format}:{target.quantization}: {message}"
    s.flush()
    return bool(job.cancel_requested) or job.status == "cancelled"


def _job_progress(job: Job) -> float:
    done = [1.0 if t.status in TERMINAL_TARGET_STATUSES else t.progress for t in job.targets]
    return PREPARE_SHARE + (1 - PREPARE_SHARE) * (sum(done) / max(len(done), 1))


def _close_target(target: JobTarget, status: str, code: str | None, message: str | None) -> None:
    target.status = status
    target.error_code, target.error_message = code, message
    target.lease_expires_at = None
    target.finished_at = utcnow()


def finish_target(s: Session, *, target_id: str, status: str, error_code: str | None = None,
                  error_message: str | None = None) -> Job | None:
    """Close a target as failed/cancelled (``record_artifact`` closes succeeded ones), then settle
    its job. Returns the job if this made it finish."""
    target = s.get(JobTarget, target_id)
    if target is None:
        raise NotFound(f"target {target_id} not found")
    _lock_job(s, target.job_id)
    target = _lock_target(s, target_id)
    assert target is not None  # read just above in this transaction; nothing deletes targets
    if target.status not in TERMINAL_TARGET_STATUSES:
        _close_target(target, status, error_code, error_message)
        s.flush()
        record_audit(s, actor=_worker_actor(target.worker_id), action="target.finish",
                     resource_type="job", resource_id=target.job_id, outcome=status,
                     organization_id=target.job.organization_id,
                     details={"target_id": target.id, "error_code": error_code})
    return settle_job(s, job_id=target.job_id)


def settle_job(s: Session, *, job_id: str) -> Job | None:
    """Finish the job once every target has finished: succeeded if all did, cancelled if a
    cancel was asked for, else failed with the first failed target's error."""
    job = _lock_job(s, job_id)
    if job is None or job.status in TERMINAL_JOB_STATUSES:
        return None
    if any(t.status not in TERMINAL_TARGET_STATUSES for t in job.targets):
        job.progress = max(job.progress, _job_progress(job))
        s.flush()
        return None
    failed = [t for t in job.targets if t.status == "failed"]
    if all(t.status == "succeeded" for t in job.targets):
        status, code, message = "succeeded", None, None
    elif job.cancel_requested and not failed:
        status, code, message = "cancelled", "cancelled", "the job was cancelled"
    else:
        first = failed[0] if failed else next(t for t in job.targets if t.status != "succeeded")
        status = "failed"
        code = first.error_code or "target_failed"
        message = f"{first.format}:{first.quantization}: {first.error_message or first.status}"
    _finish(job, status, code, message)
    s.flush()
    record_audit(s, actor=_worker_actor(job.worker_id), action="job.finish", resource_type="job",
                 resource_id=job.id, organization_id=job.organization_id, outcome=status, details={"error_code": code,
                                                              "attempts": job.attempts})
    return job


def hold_for_record(s: Session, *, job_id: str, target_id: str | None, worker_id: str) -> bool:
    """Take the job's (and the target's) row for recording an artifact, in the caller's
    transaction, before ``record_artifact``: True when this worker may still record it (the job
    runs, no cancel was asked for, and the worker still holds the target's or the prepare stage's
    lease). A conditional UPDATE, so on Postgres it waits for and then excludes a concurrent
    ``request_cancel`` (same row lock) and on SQLite it takes the write lock first: a cancel
    either comes before (nothing is recorded; the caller deletes what it uploaded) or after
    (the cancel finds the target finished). False: roll back."""
    job_ok = cast(CursorResult, s.execute(update(Job).where(Job.id == job_id, Job.status == "running",
                                                            Job.cancel_requested.is_(False))
                                          .values(progress=Job.progress))).rowcount == 1
    if not job_ok:
        return False
    if target_id is None:  # the prepare stage's shared artifacts (intermediate, imatrix, fp32)
        held = select(Job.id).where(Job.id == job_id, Job.worker_id == worker_id, Job.dispatched_at.is_(None))
    else:
        held = select(JobTarget.id).where(JobTarget.id == target_id, JobTarget.worker_id == worker_id,
                                          JobTarget.status == "running")
    return s.execute(held).first() is not None


def close_abandoned(s: Session, *, job_id: str, actor: str = "system:reconciler") -> Job | None:
    """End what nobody works on any more in a running job, then settle it; returns the job if
    it finished. With a cancel requested: a prepare stage whose lease expired makes the job
    ``cancelled``; pending targets and targets under an expired lease become ``cancelled``
    (targets a worker still holds are left to it). Without one: a dispatched job whose targets
    have all finished is settled. Used by ``request_cancel`` and the reconciler."""
    job = _lock_job(s, job_id)
    if job is None or job.status in TERMINAL_JOB_STATUSES:
        return None
    now = utcnow()
    if job.cancel_requested and job.dispatched_at is None:
        if job.lease_expires_at is not None and job.lease_expires_at > now:
            return None  # its worker is alive and will see the cancel
        _finish(job, "cancelled", None, None)
        s.flush()
        record_audit(s, actor=actor, action="job.finish", resource_type="job", resource_id=job.id,
                     organization_id=job.organization_id, outcome="cancelled",
                     details={"reason": "cancel requested and no worker holds the job"})
        return job
    if job.cancel_requested:
        for t in job.targets:
            gone = t.status == "running" and (t.lease_expires_at is None or t.lease_expires_at <= now)
            if t.status == "pending" or gone:
                _close_target(t, "cancelled", None, None)
                s.flush()
                record_audit(s, actor=actor, action="target.finish", resource_type="job", resource_id=job.id,
                             organization_id=job.organization_id, outcome="cancelled",
                             details={"target_id": t.id, "error_code": None,
                                      "reason": "cancel requested and no worker holds the target"})
    return settle_job(s, job_id=job.id) if job.dispatched_at is not None else None

