"""Retention of artifacts: soft delete, restore, purge after a grace period, legal hold.

- ``delete_artifact``: the artifact is hidden from listings and its downloads answer 410, but
  its row, its bytes and its lineage edges stay; ``purge_after`` = now + the grace period.
- ``restore_artifact``: undoes a delete until the bytes are purged.
- ``purge_due``: once ``purge_after`` has passed, the bytes are removed from the object store
  and ``purged_at`` is recorded; the row stays (the audit trail, lineage, model cards and jobs
  that name it still resolve, and show it as deleted).
- Legal hold: a held artifact can be neither deleted nor purged. A hold may be placed on an
  already deleted artifact (a hold usually arrives after someone asked for deletion): it stops
  the purge until it is released.

Lineage: deleting an artifact that others were derived from is allowed. Edges stay, the
descendants stay available (their bytes do not depend on the parent's), and the deleted node
shows ``deleted: true`` in lineage answers. A reused target keeps pointing at the deleted
artifact; reuse never picks a deleted one again (catalog/reuse.py).

Every change is audited in the caller's transaction (the caller commits), like the rest of the
catalog. ``purge_due`` is the exception: it deletes bytes, so it owns its transactions.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from .audit import RequestInfo, record_audit
from .errors import InvalidState, NotFound
from .models import Artifact, LineageEdge, iso, utcnow

log = logging.getLogger("quantyard.catalog.retention")

DEFAULT_GRACE_S = 7 * 24 * 3600.0
PURGE_ACTOR = "system:retention"


class RetentionConflict(InvalidState):
    """A retention change the artifact's state refuses; ``code`` says which (the API maps it)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _lock_artifact(s: Session, artifact_id: str, organization_id: str | None) -> Artifact:
    q = (select(Artifact).where(Artifact.id == artifact_id).with_for_update()
         .execution_options(populate_existing=True))
    art = s.execute(q).scalars().first()
    if art is None or (organization_id is not None and art.organization_id != organization_id):
        raise NotFound(f"artifact {artifact_id} not found")
    return art


def artifact_keys(art: Artifact) -> list[str]:
    """Every object the artifact's bytes live in: its main file and its companion files."""
    companions = (art.meta or {}).get("companion_files") or []
    return [art.storage_key] + [c["key"] for c in companions if c.get("key")]


def derived_artifact_ids(s: Session, *, artifact_id: str) -> list[str]:
    """Artifacts made directly from this one (their lineage edges stay when it is deleted)."""
    q = (select(LineageEdge.child_id)
         .where(LineageEdge.parent_type == "artifact", LineageEdge.parent_id == artifact_id,
                LineageEdge.child_type == "artifact")
         .order_by(LineageEdge.created_at, LineageEdge.id))
    return list(dict.fromkeys(s.execute(q).scalars()))


def delete_artifact(s: Session, *, artifact_id: str, actor: str, reason: str | None = None,
                    grace_s: float = DEFAULT_GRACE_S, request: RequestInfo | None = None,
                    organization_id: str | None = None, now: datetime | None = None) -> Artifact:
    """Soft delete: refused under a legal hold (``legal_hold``) or once purged (``purged``);
    deleting an already deleted artifact changes nothing (audited with outcome ``noop``)."""
    art = _lock_artifact(s, artifact_id, organization_id)
    if art.purged_at is not None:
        raise RetentionConflict("purged", f"artifact {artifact_id} was purged at {iso(art.purged_at)}")
    if art.legal_hold_at is not None:
        raise RetentionConflict("legal_hold", f"artifact {artifact_id} is under legal hold "
                                f"({art.legal_hold_reason}); it cannot be deleted until the hold is released")
    derived = derived_artifact_ids(s, artifact_id=artifact_id)
    outcome = "noop"
    if art.deleted_at is None:
        now = now or utcnow()
        art.deleted_at, art.deleted_by, art.delete_reason = now, actor, reason
        art.purge_after = now + timedelta(seconds=max(grace_s, 0.0))
        outcome = "success"
    s.flush()
    record_audit(s, actor=actor, action="artifact.delete", resource_type="artifact",
                 organization_id=art.organization_id, resource_id=artifact_id,
                 outcome=outcome, request=request,
                 details={"reason": reason, "purge_after": iso(art.purge_after), "sha256": art.sha256,
                          "derived_artifacts": derived})
    return art


def restore_artifact(s: Session, *, artifact_id: str, actor: str, request: RequestInfo | None = None,
                     organization_id: str | None = None) -> Artifact:
    """Undo a soft delete within the grace period: ``not_deleted`` / ``purged`` otherwise."""
    art = _lock_artifact(s, artifact_id, organization_id)
    if art.purged_at is not None:
        raise RetentionConflict("purged", f"artifact {artifact_id} was purged at {iso(art.purged_at)}; "
                                "its bytes are gone")
    if art.deleted_at is None:
        raise RetentionConflict("not_deleted", f"artifact {artifact_id} is not deleted")
    deleted = {"deleted_at": iso(art.deleted_at), "deleted_by": art.deleted_by, "reason": art.delete_reason}
    art.deleted_at = art.deleted_by = art.delete_reason = art.purge_after = None
    s.flush()
    record_audit(s, actor=actor, action="artifact.restore", resource_type="artifact",
                 organization_id=art.organization_id, resource_id=artifact_id,
                 request=request, details={"deleted": deleted})
    return art


def set_legal_hold(s: Session, *, artifact_id: str, reason: str, actor: str,
                   request: RequestInfo | None = None, organization_id: str | None = None) -> Artifact:
    """Place (or re-word) a legal hold; allowed on a deleted artifact until it is purged."""
    if not reason or not reason.strip():
        raise RetentionConflict("reason_required", "a legal hold needs a reason")
    art = _lock_artifact(s, artifact_id, organization_id)
    if art.purged_at is not None:
        raise RetentionConflict("purged", f"artifact {artifact_id} was purged at {iso(art.purged_at)}; "
                                "there is nothing left to hold")
    previous = art.legal_hold_reason if art.legal_hold_at is not None else None
    if art.legal_hold_at is None:
        art.legal_hold_at, art.legal_hold_by = utcnow(), actor
    art.legal_hold_reason = reason.strip()
    s.flush()
    record_audit(s, actor=actor, action="artifact.legal_hold", resource_type="artifact",
                 organization_id=art.organization_id, resource_id=artifact_id,
                 request=request, details={"reason": art.legal_hold_reason, "previous_reason": previous,
                                           "deleted": art.deleted_at is not None})
    return art


def release_legal_hold(s: Session, *, artifact_id: str, actor: str, reason: str | None = None,
                       request: RequestInfo | None = None, organization_id: str | None = None) -> Artifact:
    """Lift the hold (outcome ``noop`` when there was none). A deleted artifact's purge clock was
    never stopped: if its grace period is over it is purged at the next purge run."""
    art = _lock_artifact(s, artifact_id, organization_id)
    held = {"at": iso(art.legal_hold_at), "by": art.legal_hold_by, "reason": art.legal_hold_reason}
    outcome = "noop" if art.legal_hold_at is None else "success"
    art.legal_hold_at = art.legal_hold_by = art.legal_hold_reason = None
    s.flush()
    record_audit(s, actor=actor, action="artifact.legal_hold_release", resource_type="artifact",
                 organization_id=art.organization_id,
                 resource_id=artifact_id, outcome=outcome, request=request,
                 details={"released": held if outcome == "success" else None, "reason": reason})
    return art


def _due(now: datetime, *, ignore_grace: bool):
    q = select(Artifact.id).where(Artifact.deleted_at.is_not(None), Artifact.purged_at.is_(None),
                                  Artifact.legal_hold_at.is_(None))
    if not ignore_grace:
        q = q.where(Artifact.purge_after <= now)
    return q.order_by(Artifact.purge_after, Artifact.id)


def due_for_purge(s: Session, *, now: datetime | None = None, ignore_grace: bool = False,
                  limit: int = 100, organization_id: str | None = None) -> list[str]:
    """Ids of deleted artifacts whose bytes may go now (grace over, no legal hold)."""
    q = _due(now or utcnow(), ignore_grace=ignore_grace)
    if organization_id is not None:
        q = q.where(Artifact.organization_id == organization_id)
    return list(s.execute(q.limit(limit)).scalars())


def _shared_keys(s: Session, art: Artifact, keys: list[str]) -> set[str]:
    """Keys another unpurged artifact row also stores its bytes at (never deleted from under it)."""
    # Companion files live beside the main file, so rows sharing a main key are the ones to check.
    others = s.execute(select(Artifact).where(Artifact.id != art.id, Artifact.purged_at.is_(None),
                                              Artifact.storage_key.in_(keys))).scalars()
    return {k for other in others for k in artifact_keys(other)} & set(keys)


def purge_artifact(s: Session, store, *, artifact_id: str, actor: str = PURGE_ACTOR,
                   now: datetime | None = None, ignore_grace: bool = False) -> dict[str, Any] | None:
    """Remove one deleted artifact's bytes and record ``purged_at`` + an ``artifact.purge`` event;
    None when it is no longer due (restored, held, purged by someone else meanwhile).

    Order matters: the row is locked and re-checked, the event and ``purged_at`` are written,
    then the bytes are deleted, then the caller commits. A failed byte delete rolls everything
    back (the next run retries; deleting a missing object is a no-op); a restore or hold that
    waits on the row lock sees ``purged_at`` afterwards."""
    now = now or utcnow()
    art = _lock_artifact(s, artifact_id, None)
    due = (art.deleted_at is not None and art.purged_at is None and art.legal_hold_at is None
           and (ignore_grace or (art.purge_after is not None and art.purge_after <= now)))
    if not due:
        return None
    keys = artifact_keys(art)
    kept = _shared_keys(s, art, keys)
    removed = [k for k in keys if k not in kept]
    art.purged_at = now
    s.flush()
    record_audit(s, actor=actor, action="artifact.purge", resource_type="artifact",
                 organization_id=art.organization_id, resource_id=art.id,
                 details={"keys": removed, "kept_shared_keys": sorted(kept), "sha256": art.sha256,
                          "size_bytes": art.size_bytes, "deleted_at": iso(art.deleted_at),
                          "purge_after": iso(art.purge_after), "early": bool(ignore_grace)})
    for key in removed:
        store.delete(key)
    return {"id": art.id, "keys": removed, "kept_shared_keys": sorted(kept), "size_bytes": art.size_bytes}


def purge_due(sessions: sessionmaker, store, *, now: datetime | None = None, ignore_grace: bool = False,
              limit: int = 1000, actor: str = PURGE_ACTOR) -> list[dict[str, Any]]:
    """Purge every artifact that is due, one transaction each (one failure does not stop the
    rest; it is logged and retried next run). Returns what was purged."""
    now = now or utcnow()
    with sessions() as s:
        ids = due_for_purge(s, now=now, ignore_grace=ignore_grace, limit=limit)
    purged = []
    for artifact_id in ids:
        try:
            with sessions() as s:
                done = purge_artifact(s, store, artifact_id=artifact_id, actor=actor, now=now,
                                      ignore_grace=ignore_grace)
                s.commit()
        except Exception:  # the next run retries this one
            log.exception("purging artifact %s failed", artifact_id)
            continue
        if done is not None:
            purged.append(done)
    return purged


__all__ = [
    "DEFAULT_GRACE_S", "PURGE_ACTOR", "RetentionConflict", "artifact_keys", "delete_artifact",
    "derived_artifact_ids", "due_for_purge", "purge_artifact", "purge_due", "release_legal_hold",
    "restore_artifact", "set_legal_hold",
]
