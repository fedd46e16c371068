"""The append-only, hash-chained audit log.

Each event stores ``prev_hash`` (the previous event's hash, ``"0"*64`` for the first) and ``hash`` =
sha256 over the canonical JSON (sorted keys, no whitespace, UTF-8) of all its other fields,
``seq`` and ``prev_hash`` included. ``seq`` is gapless, so a deleted row shows as a gap; an edited
row no longer matches its hash; an inserted or reordered row breaks the ``prev_hash`` links.

Appends are serialised so the chain cannot fork: on Postgres a transaction-level advisory lock is
taken before the head is read (held until the caller's commit or rollback); on SQLite a no-op
write takes the database write lock first. ``prev_hash`` is also UNIQUE, so a fork cannot be
stored even by a writer that bypasses this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from .models import GENESIS_HASH, AuditEvent, hashed_fields, new_id, utcnow

# pg_advisory_xact_lock key: first 8 bytes of sha256("quantyard:audit-chain") as a signed bigint.
AUDIT_LOCK_KEY = int.from_bytes(hashlib.sha256(b"quantyard:audit-chain").digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class RequestInfo:
    request_id: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True)
class AuditVerification:
    ok: bool
    checked: int
    first_bad_id: str | None = None
    reason: str | None = None
    head_seq: int | None = None
    head_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_bad_id": self.first_bad_id,
            "reason": self.reason,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
        }


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def event_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(fields)).hexdigest()


def _jsonable(details: dict[str, Any] | None) -> dict[str, Any]:
    # Round-trip through JSON so what is hashed is exactly what the database gives back.
    return json.loads(json.dumps(details or {}, default=str, allow_nan=False))


def lock_audit_chain(s: Session) -> None:
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_LOCK_KEY})
    else:
        # BEGIN + a write statement acquires SQLite's write lock before the head is read.
        s.execute(delete(AuditEvent).where(AuditEvent.seq < 0))


def record_audit(
    s: Session,
    *,
    actor: str,
    action: str,
    resource_type: str,
    resource_id: str | None,
    outcome: str = "success",
    request: RequestInfo | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain in the session's transaction (the caller commits)."""
    lock_audit_chain(s)
    head = s.execute(select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)).first()
    seq, prev_hash = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
    request = request or RequestInfo()
    event = AuditEvent(
        seq=seq,
        id=new_id("aud"),
        at=utcnow(),
        actor=actor,
        action=action,
        resource_type=resource_type,
        resource_id=resource_id,
        outcome=outcome,
        request_id=request.request_id,
        source_ip=request.source_ip,
        user_agent=request.user_agent,
        details=_jsonable(details),
        prev_hash=prev_hash,
    )
    event.hash = event_hash(event.hashed_fields())
    s.add(event)
    s.flush()
    return event


def verify_audit_chain(s: Session, *, batch_size: int = 1000) -> AuditVerification:
    """Recompute the whole chain, oldest first. Stops at the first bad event."""
    expected_seq, prev_hash, checked = 1, GENESIS_HASH, 0
    last_seq = 0
    table = AuditEvent.__table__
    while True:
        rows = s.execute(
            select(table).where(table.c.seq > last_seq).order_by(table.c.seq).limit(batch_size)
        ).mappings().all()
        if not rows:
            break
        for row in rows:
            reason = None
            if row["seq"] != expected_seq:
                reason = f"sequence gap: expected seq {expected_seq}, found {row['seq']} (events missing)"
            elif row["prev_hash"] != prev_hash:
                reason = f"seq {row['seq']}: prev_hash does not match the previous event's hash"
            elif event_hash(hashed_fields(row)) != row["hash"]:
                reason = f"seq {row['seq']}: hash does not match the event's contents (edited)"
            if reason:
                return AuditVerification(
                    False, checked, row["id"], reason, last_seq or None, prev_hash if checked else None
                )
            checked += 1
            expected_seq, prev_hash, last_seq = row["seq"] + 1, row["hash"], row["seq"]
    return AuditVerification(True, checked, None, None, last_seq or None, prev_hash if checked else None)


def audit_events(
    s: Session, *, resource_type: str | None = None, resource_id: str | None = None, limit: int = 100,
    before_seq: int | None = None,
) -> list[AuditEvent]:
    """Newest first; filter by resource."""
    q = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(max(1, min(limit, 1000)))
    if resource_type:
        q = q.where(AuditEvent.resource_type == resource_type)
    if resource_id:
        q = q.where(AuditEvent.resource_id == resource_id)
    if before_seq is not None:
        q = q.where(AuditEvent.seq < before_seq)
    return list(s.execute(q).scalars())
