"""The append-only, hash-chained audit log.

Each event stores ``prev_hash`` (the previous event's hash, ``"0"*64`` for the first) and ``hash`` =
sha256 over the canonical JSON (sorted keys, no whitespace, UTF-8) of all its other fields,
``seq`` and ``prev_hash`` included. ``seq`` is gapless, so a deleted row shows as a gap; an edited
row no longer matches its hash; an inserted or reordered row breaks the ``prev_hash`` links.

Appends are serialised so the chain cannot fork: on Postgres a transaction-level advisory lock is
taken before the head is read (held until the caller's commit or rollback); on SQLite a no-op
write takes the database write lock first. ``prev_hash`` is also UNIQUE, so a fork cannot be
stored even by a writer that bypasses this module.

Fail closed: an append that the database refuses raises :class:`AuditUnavailable` in the caller's
transaction, so the change it describes is rolled back with it (the API answers 503).

The verifier (``verify_events`` / ``verify_audit_chain``) walks events in ``(seq, id)`` order and
stops at the first broken link, naming the event, its seq and what is wrong with it:
``edited`` (contents no longer match the hash), ``missing`` (a seq gap: deleted), ``inserted``
(self-consistent but not chained to its predecessor: forged), ``duplicate`` (two events claim one
seq: a forged fork), ``reordered`` (the hash is valid for another seq: moved or renumbered),
``rewritten`` / ``truncated`` (an anchor written earlier no longer matches: see ``anchor.py``).
``verify_audit_chain`` also fails with ``triggers_missing`` / ``grants_unsafe`` when the database
would no longer refuse tampering (``audit_guard.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from itertools import groupby
from typing import Any

from sqlalchemy import delete, func, or_, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from .audit_guard import Protection, check_protection
from .audit_seal import AUDIT_PENDING, PENDING_FLAG, is_deferred, pending_count, seal_before_read
from .errors import CatalogError
from .models import (
    GENESIS_HASH,
    HASHED_COLUMNS,
    AuditEvent,
    hashed_fields,
    new_id,
    utcnow,
    with_optional_hashed,
)

log = logging.getLogger("quantyard.catalog.audit")

# pg_advisory_xact_lock key: first 8 bytes of sha256("quantyard:audit-chain") as a signed bigint.
AUDIT_LOCK_KEY = int.from_bytes(hashlib.sha256(b"quantyard:audit-chain").digest()[:8], "big", signed=True)

# When a row's hash fails at seq S, the verifier tries the seqs around S to tell "moved" from "edited".
_REORDER_WINDOW = 64


class AuditUnavailable(CatalogError):
    """The audit record could not be written; the change it describes must not be committed."""

    code = "audit_unavailable"


@dataclass(frozen=True)
class RequestInfo:
    request_id: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None
    # The caller's organisation: recorded on the event unless record_audit is told another one.
    organization_id: str | None = None


@dataclass(frozen=True)
class AuditVerification:
    ok: bool
    checked: int
    first_bad_id: str | None = None
    reason: str | None = None
    head_seq: int | None = None
    head_hash: str | None = None
    first_bad_seq: int | None = None
    # edited | missing | inserted | duplicate | reordered | rewritten | truncated | triggers_missing | grants_unsafe
    problem: str | None = None
    anchors_checked: int = 0
    # The database's protections (audit_guard.py): what is missing, whatever the chain says.
    triggers_missing: tuple[str, ...] = ()
    grants_unsafe: tuple[str, ...] = ()
    # Committed events not chained yet (deferred chaining, audit_seal.py): not checked here.
    pending: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["triggers_missing"], data["grants_unsafe"] = list(self.triggers_missing), list(self.grants_unsafe)
        return data


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
    organization_id: str | None = None,
) -> AuditEvent:
    """Append one event to the chain in the session's transaction (the caller commits).

    Raises :class:`AuditUnavailable` when the database refuses the append; the caller's
    transaction is then unusable and must be rolled back (no change without its record)."""
    s.flush()  # the audited change fails on its own account, before the audit write is tried
    if is_deferred(s):
        return _record_pending(s, actor=actor, action=action, resource_type=resource_type, resource_id=resource_id,
                               outcome=outcome, request=request or RequestInfo(), details=details,
                               organization_id=organization_id)
    try:
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
            organization_id=organization_id if organization_id is not None else request.organization_id,
        )
        event.hash = event_hash(event.hashed_fields())
        s.add(event)
        s.flush()
    except DBAPIError as exc:
        raise audit_refused(action, resource_type, resource_id, exc) from exc
    return event


def pending_event(*, actor: str, action: str, resource_type: str, resource_id: str | None, outcome: str = "success",
                  request: RequestInfo | None = None, details: dict[str, Any] | None = None,
                  organization_id: str | None = None) -> dict[str, Any]:
    """The audit_pending row of one event (deferred chaining): what ``record_audit`` inserts, for
    a caller that writes it in the same statement as its change (``catalog.create_job``)."""
    request = request or RequestInfo()
    return dict(id=new_id("aud"), at=utcnow(), actor=actor, action=action, resource_type=resource_type,
                resource_id=resource_id, outcome=outcome, request_id=request.request_id,
                source_ip=request.source_ip, user_agent=request.user_agent, details=_jsonable(details),
                organization_id=organization_id if organization_id is not None else request.organization_id)


def audit_refused(action: str, resource_type: str, resource_id: str | None, exc: DBAPIError) -> AuditUnavailable:
    log.error("audit append refused for %s %s/%s: %s", action, resource_type, resource_id, exc.orig)
    return AuditUnavailable(f"the audit record for {action} could not be written, so the change was not "
                            "made; try again later")


def _record_pending(s: Session, *, actor, action, resource_type, resource_id, outcome, request: RequestInfo,
                    details, organization_id) -> AuditEvent:
    """Deferred chaining (audit_seal.py): the event goes to audit_pending in the caller's
    transaction, no chain lock; the process's sealer chains it after the commit. Returns the event
    unchained (no seq or hashes yet; not part of the session)."""
    fields = pending_event(actor=actor, action=action, resource_type=resource_type, resource_id=resource_id,
                           outcome=outcome, request=request, details=details, organization_id=organization_id)
    try:
        s.execute(AUDIT_PENDING.insert().values(**fields))
    except DBAPIError as exc:
        raise audit_refused(action, resource_type, resource_id, exc) from exc
    s.info[PENDING_FLAG] = True
    return AuditEvent(**fields)


# ------------------------------------------------------------------------------------ verification


def _event_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The hashed fields of a database row or of an exported JSON line (whose ``at`` is a string)."""
    if isinstance(row.get("at"), datetime):
        return hashed_fields(row)
    fields = {c: row.get(c) for c in HASHED_COLUMNS}
    fields["details"] = fields["details"] or {}
    return with_optional_hashed(fields, row.get)


def _hash_ok(row: Mapping[str, Any]) -> bool:
    return event_hash(_event_fields(row)) == row["hash"]


def _written_as_seq(row: Mapping[str, Any]) -> int | None:
    """The seq this row's hash was computed for, when it is a nearby other seq (a moved row)."""
    fields = _event_fields(row)
    here = row["seq"]
    for delta in range(1, _REORDER_WINDOW + 1):
        for seq in (here + delta, here - delta):
            if seq >= 1 and event_hash({**fields, "seq": seq}) == row["hash"]:
                return seq
    return None


def _diagnose(row: Mapping[str, Any], expected_seq: int, prev_hash: str,
              recent: deque[tuple[int, str, str]]) -> tuple[str, str, Mapping[str, Any]] | None:
    """(problem, reason, culprit) for one event in chain position ``expected_seq``, or None when it
    links. ``recent``: (seq, id, hash) of the last accepted events, newest last."""
    seq = row["seq"]
    if seq > expected_seq:
        missing = f"seq {expected_seq}" if seq == expected_seq + 1 else f"seqs {expected_seq}..{seq - 1}"
        return "missing", f"sequence gap before seq {seq}: {missing} missing (events deleted)", row
    if row["prev_hash"] != prev_hash:
        # Does it link to an older accepted event? Then the events after that one were slipped in
        # (each chained to its predecessor, so only this link shows it): the first of them is forged.
        older = list(recent)[:-1]
        for i, (s_, _id, h) in enumerate(older):
            if h == row["prev_hash"]:
                first_seq, first_id, _ = older[i + 1] if i + 1 < len(older) else recent[-1]
                return "inserted", (f"seq {first_seq}..{seq - 1} are not part of the chain: seq {seq}'s "
                                    f"prev_hash is the hash of seq {s_}, so they were inserted (forged)"), \
                    {"seq": first_seq, "id": first_id}
        if _hash_ok(row):
            pred = recent[-1][1] if recent else None
            return "inserted", (f"seq {seq}: prev_hash does not match the hash of seq {seq - 1} ({pred}), though "
                                "the event matches its own hash: a forged or inserted event (or its predecessor "
                                "was rewritten with a recomputed hash)"), row
        written = _written_as_seq(row)
        if written is not None:
            return "reordered", (f"seq {seq}: this event was written as seq {written} (its hash is valid for "
                                 f"that seq) and its prev_hash does not match seq {seq - 1}: moved or "
                                 "renumbered"), row
        return "edited", f"seq {seq}: neither its prev_hash nor its hash match (edited, prev_hash included)", row
    if not _hash_ok(row):
        return "edited", f"seq {seq}: hash does not match the event's contents (edited)", row
    return None


def _pick_forged(group: list[Mapping[str, Any]], prev_hash: str, next_row: Mapping[str, Any] | None):
    """Of several events claiming one seq, the one that is not part of the chain."""
    def genuineness(r):
        followed = next_row is not None and next_row["prev_hash"] == r["hash"]
        return (followed, r["prev_hash"] == prev_hash, _hash_ok(r))

    ranked = sorted(group, key=genuineness, reverse=True)  # stable: ties keep (seq, id) order
    return ranked[0], ranked[1]


def verify_events(
    rows: Iterable[Mapping[str, Any]],
    *,
    start_seq: int = 1,
    start_hash: str = GENESIS_HASH,
    anchors: Mapping[int, list[Mapping[str, Any]]] | None = None,
) -> AuditVerification:
    """Walk events (mappings with every hashed column and ``hash``) in ``(seq, id)`` order from
    ``start_seq`` / ``start_hash``; stop at the first broken link. ``anchors``: seq -> anchor
    documents ({"seq", "hash", "key", ...}) whose hash the event at that seq must still have."""
    anchors = anchors or {}
    n_anchors = sum(len(group) for group in anchors.values())
    expected_seq, prev_hash, checked, last_ok_anchor = start_seq, start_hash, 0, 0
    recent: deque[tuple[int, str, str]] = deque(maxlen=_REORDER_WINDOW)
    groups = groupby(rows, key=lambda r: r["seq"])
    pending = next(groups, None)

    def fail(row, problem, reason):
        # What verified before the culprit (an inserted culprit can lie behind the current row).
        good = [r for r in recent if row is None or r[0] < row["seq"]]
        ok_before = checked - (len(recent) - len(good))
        head = good[-1] if good else None
        return AuditVerification(False, ok_before, row["id"] if row else None, reason,
                                 head[0] if head else None, head[2] if head else None,
                                 row["seq"] if row else expected_seq, problem, n_anchors)

    while pending is not None:
        seq, group = pending[0], list(pending[1])
        pending = next(groups, None)
        if len(group) > 1:
            following = None
            if pending is not None:
                following_group = list(pending[1])
                pending = (pending[0], iter(following_group))
                following = following_group[0]
            genuine, forged = _pick_forged(group, prev_hash, following)
            return fail(forged, "duplicate", f"seq {seq} is claimed by {len(group)} events; {forged['id']} is not "
                        f"the one the chain continues from ({genuine['id']}): a forged or inserted event")
        row = group[0]
        diagnosis = _diagnose(row, expected_seq, prev_hash, recent)
        if diagnosis:
            problem, reason, culprit = diagnosis
            return fail(culprit, problem, reason)
        for anchor in anchors.get(seq, []):
            if anchor["hash"] != row["hash"]:
                return fail(row, "rewritten", f"seq {seq}: anchor {anchor.get('key')} recorded hash "
                            f"{anchor['hash'][:16]}..., the chain now has {row['hash'][:16]}...: the chain was "
                            f"rewritten between seq {last_ok_anchor + 1} and seq {seq}")
            last_ok_anchor = seq
        checked += 1
        expected_seq, prev_hash = seq + 1, row["hash"]
        recent.append((seq, row["id"], row["hash"]))
    beyond = [a for s_, group in anchors.items() if s_ >= expected_seq for a in group]
    if beyond:
        top = max(beyond, key=lambda a: a["seq"])
        return fail(None, "truncated", f"anchor {top.get('key')} covers seq {top['seq']} but the chain ends at "
                    f"seq {expected_seq - 1}: events {expected_seq}..{top['seq']} were deleted")
    return AuditVerification(True, checked, None, None, expected_seq - 1 if checked else None,
                             prev_hash if checked else None, anchors_checked=n_anchors)


def iter_chain_rows(s: Session, *, first_seq: int = 1, last_seq: int | None = None,
                    batch_size: int = 1000) -> Iterator[dict[str, Any]]:
    """Rows of audit_events in ``(seq, id)`` order, fetched in keyset batches (duplicates kept)."""
    table = AuditEvent.__table__
    after: tuple[int, str] | None = None
    while True:
        q = select(table).where(table.c.seq >= first_seq).order_by(table.c.seq, table.c.id).limit(batch_size)
        if last_seq is not None:
            q = q.where(table.c.seq <= last_seq)
        if after is not None:  # `seq >= last` keeps it an index range scan; the OR only breaks ties
            q = q.where(table.c.seq >= after[0], or_(table.c.seq > after[0], table.c.id > after[1]))
        rows = s.execute(q).mappings().all()
        if not rows:
            return
        for row in rows:
            yield dict(row)
        after = (rows[-1]["seq"], rows[-1]["id"])


def verify_audit_chain(s: Session, *, batch_size: int = 1000,
                       anchors: Iterable[Mapping[str, Any]] | None = None,
                       app_role: str | None = None, protection: bool = True) -> AuditVerification:
    """Recompute the whole chain, oldest first. Stops at the first bad event. ``anchors``: documents
    read back from the object store (``anchor.read_anchors``) the chain must still agree with.

    ``protection``: also check that the append-only triggers are in place and that no role but the
    owner (``app_role`` above all) may UPDATE/DELETE/TRUNCATE audit_events (audit_guard.py); a
    missing protection makes the verification fail (``triggers_missing`` / ``grants_unsafe``)."""
    by_seq: dict[int, list[Mapping[str, Any]]] = {}
    for a in anchors or ():
        by_seq.setdefault(int(a["seq"]), []).append(a)
    result = verify_events(iter_chain_rows(s, batch_size=batch_size), anchors=by_seq)
    result = replace(result, pending=pending_count(s))
    return with_protection(result, check_protection(s, app_role=app_role)) if protection else result


def with_protection(result: AuditVerification, guard: Protection) -> AuditVerification:
    """The chain's verdict with the database's protections added: a chain that verifies still fails
    when a protection is gone (its problem names which); a broken chain keeps its own problem."""
    result = replace(result, triggers_missing=guard.triggers_missing, grants_unsafe=guard.grants_unsafe)
    if guard.ok:
        return result
    if not result.ok:
        return replace(result, reason=f"{result.reason}; also {guard.summary()}")
    return replace(result, ok=False, problem="triggers_missing" if guard.triggers_missing else "grants_unsafe",
                   reason=guard.summary())


# ------------------------------------------------------------------------------------ reading, export


def audit_events(
    s: Session, *, resource_type: str | None = None, resource_id: str | None = None, limit: int = 100,
    before_seq: int | None = None,
) -> list[AuditEvent]:
    """Newest first; filter by resource. Deferred chaining: what is pending is chained first."""
    seal_before_read(s)
    q = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(max(1, min(limit, 1000)))
    if resource_type:
        q = q.where(AuditEvent.resource_type == resource_type)
    if resource_id:
        q = q.where(AuditEvent.resource_id == resource_id)
    if before_seq is not None:
        q = q.where(AuditEvent.seq < before_seq)
    return list(s.execute(q).scalars())


def seq_range(s: Session, *, since: datetime | None = None, until: datetime | None = None) -> tuple[int, int] | None:
    """The seqs of the first event at or after ``since`` and the last one before ``until``.

    An export covers every seq between them, so it is one unbroken piece of the chain even where
    hosts' clocks disagreed by a little (an event near an edge may be slightly outside the range)."""
    lo = select(func.min(AuditEvent.seq))
    hi = select(func.max(AuditEvent.seq))
    if since is not None:
        lo = lo.where(AuditEvent.at >= since)
        hi = hi.where(AuditEvent.at >= since)
    if until is not None:
        lo = lo.where(AuditEvent.at < until)
        hi = hi.where(AuditEvent.at < until)
    first, last = s.execute(lo).scalar(), s.execute(hi).scalar()
    return None if first is None or last is None else (first, last)


def event_line(row: Mapping[str, Any]) -> str:
    """One exported event: every hashed field plus ``hash``, as one JSON line."""
    return canonical_json({**_event_fields(row), "hash": row["hash"]}).decode() + "\n"


def iter_export(s: Session, *, since: datetime | None = None, until: datetime | None = None,
                batch_size: int = 1000, organization_id: str | None = None) -> Iterator[str]:
    """JSON lines for the events in ``[since, until)``, oldest first (see :func:`seq_range`).

    ``organization_id``: only that organisation's events. Each line still carries its own hash and
    prev_hash (so every event can be checked against its hash), but the lines no longer link up:
    the chain runs through all organisations' events."""
    seal_before_read(s)
    bounds = seq_range(s, since=since, until=until)
    if bounds is None:
        return
    for row in iter_chain_rows(s, first_seq=bounds[0], last_seq=bounds[1], batch_size=batch_size):
        if organization_id is None or row.get("organization_id") == organization_id:
            yield event_line(row)


def verify_export(lines: Iterable[str | bytes], *, start_hash: str | None = None) -> AuditVerification:
    """Re-verify exported lines on their own: every event matches its hash and links to the one
    before it. The first line's ``prev_hash`` is taken on trust unless ``start_hash`` is given
    (e.g. the hash of the last event of the previous export, or an anchor)."""
    events = (json.loads(line) for line in lines if line.strip())
    first = next(events, None)
    if first is None:
        return AuditVerification(True, 0)

    def chained() -> Iterator[dict[str, Any]]:
        yield first
        yield from events

    return verify_events(chained(), start_seq=first["seq"],
                         start_hash=first["prev_hash"] if start_hash is None else start_hash)


__all__ = [
    "AUDIT_LOCK_KEY", "AuditUnavailable", "AuditVerification", "RequestInfo", "audit_events", "audit_refused",
    "canonical_json", "event_hash", "event_line", "iter_chain_rows", "iter_export", "lock_audit_chain", "pending_event",
    "record_audit", "seq_range", "verify_audit_chain", "verify_events", "verify_export", "with_protection",
]
