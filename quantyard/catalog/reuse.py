"""Reuse by recipe: a target whose recipe hash matches an existing artifact gets that artifact.

The recipe (worker/publish.py ``target_recipe``) is the source's sha256, the target spec, the
engine version and the digests of the inputs it was made from (intermediate, importance
matrix), so equal hashes mean the same bytes would be made again. The worker computes the
hashes and checks the bytes are still in the object store; this module picks candidates and
records the reuse (caller commits).

Only *present* artifacts are reused: not deleted (nor purged), not withdrawn. A tenant only
reuses its own organisation's artifacts (``organization_id``), so reuse can never hand a job
another tenant's artifact.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from .artifacts import assign_target_artifact
from .audit import record_audit
from .errors import InvalidState, NotFound
from .jobs import _lock_job, _worker_actor
from .models import TERMINAL_TARGET_STATUSES, Artifact, JobTarget


def _scoped(q, organization_id: str | None):
    return q if organization_id is None else q.where(Artifact.organization_id == organization_id)


def is_present(art: Artifact) -> bool:
    """In the catalog as usable: not deleted, not purged, not withdrawn (bytes: the caller checks)."""
    return art.deleted_at is None and art.purged_at is None and art.withdrawn_at is None


def reusable_artifacts(s: Session, *, recipe_hash: str, organization_id: str | None = None,
                       limit: int = 5) -> list[Artifact]:
    """Present artifacts made by this recipe, newest first."""
    q = (select(Artifact)
         .where(Artifact.recipe_hash == recipe_hash, Artifact.deleted_at.is_(None),
                Artifact.purged_at.is_(None), Artifact.withdrawn_at.is_(None))
         .order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(limit))
    return list(s.execute(_scoped(q, organization_id)).scalars())


def recipe_digests(s: Session, *, recipe_hash: str, organization_id: str | None = None) -> list[str]:
    """The sha256 of every artifact this recipe ever made, deleted ones included: a recipe that
    names an input by its digest can be recognised even when that input's bytes are gone."""
    q = (select(Artifact.sha256).where(Artifact.recipe_hash == recipe_hash)
         .order_by(Artifact.created_at.desc()))
    return list(dict.fromkeys(s.execute(_scoped(q, organization_id)).scalars()))


def reuse_artifact(s: Session, *, target_id: str, artifact_id: str, recipe_hash: str | None = None,
                   actor: str | None = None, organization_id: str | None = None) -> JobTarget:
    """Answer a target with an existing artifact: the target succeeds, marked ``reused`` (and
    ``reused_from_job``: the job that made the artifact), with an ``artifact.reuse`` event. A
    target that already finished is returned unchanged (a redelivered task). The caller settles
    the job (``settle_job``) and commits."""
    target = s.get(JobTarget, target_id)
    if target is None:
        raise NotFound(f"target {target_id} not found")
    job = _lock_job(s, target.job_id)
    if job is None:
        raise NotFound(f"job {target.job_id} not found")
    target = s.execute(select(JobTarget).where(JobTarget.id == target_id).with_for_update()
                       .execution_options(populate_existing=True)).scalars().one()
    if target.status in TERMINAL_TARGET_STATUSES:
        return target
    art = s.get(Artifact, artifact_id)
    if art is None or (organization_id is not None and art.organization_id != organization_id):
        raise NotFound(f"artifact {artifact_id} not found")
    if not is_present(art):
        raise InvalidState(f"artifact {artifact_id} is deleted or withdrawn; it cannot be reused")
    assign_target_artifact(target, art.id)
    target.reused, target.reused_from_job = True, art.job_id
    s.flush()
    s.expire(job, ["artifacts"])
    record_audit(s, actor=actor or _worker_actor(target.worker_id or job.worker_id), action="artifact.reuse",
                 resource_type="artifact", organization_id=art.organization_id, resource_id=art.id,
                 details={"job_id": job.id, "target_id": target.id, "target": target.key,
                          "recipe_hash": recipe_hash or art.recipe_hash, "reused_from_job": art.job_id,
                          "sha256": art.sha256})
    return target


__all__ = ["is_present", "recipe_digests", "reusable_artifacts", "reuse_artifact"]
