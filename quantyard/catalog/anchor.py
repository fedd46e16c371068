"""Anchoring the audit chain's head in the object store.

An anchor is a small JSON object ``audit-anchors/<UTC timestamp>-<seq>.json`` holding the chain
head at that moment: ``{"seq", "hash", "at", "count", "anchored_at", "retention"}``. A chain that
was rewritten and re-hashed consistently still verifies on its own; it no longer matches the
anchors written before the rewrite (``verify_audit_chain(s, anchors=read_anchors(store))``).

The anchors are only as good as the app's inability to rewrite them. On S3 with Object Lock
enabled on the bucket each anchor is written with a retention (COMPLIANCE by default), so no
one can delete or overwrite that version until it expires; an overwrite only adds a newer
version, and ``read_anchors`` reads every version. Elsewhere (a local directory, a bucket without
Object Lock) the anchor records ``"retention": "unsupported"``: it is still a second copy
outside the database, but one the app itself could rewrite.

Each anchor written is itself an ``audit.anchor`` event in the chain. ``anchor_if_due`` writes
one when events were added since the last anchor and either the last is older than an interval
or ``every_events`` events came after it; workers call it from their consumer timer
(worker/celery_app.py) and API processes from a background thread (:class:`AnchorWatcher`), so the
check (two index lookups) never runs on a request. Every API and worker process also anchors when
it shuts down (:func:`anchor_on_shutdown`). On Postgres one writer at a time holds a try-lock and
re-checks under it, so processes racing for the same head write one anchor, not several.

The tail guarantee: events after the newest anchor can be cut off by a database owner without
the anchors noticing. That tail is at most ``every_events`` events (plus what arrives between two
checks, a few seconds' worth) or ``interval`` seconds old, and after a clean shutdown it is empty.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from quantyard.storage import S3Store

from .audit import AuditVerification, canonical_json, record_audit, verify_audit_chain
from .audit_seal import is_deferred, seal_pending
from .models import AuditEvent, iso, utcnow

log = logging.getLogger("quantyard.catalog.anchor")

ANCHOR_PREFIX = "audit-anchors/"
ANCHOR_ACTION = "audit.anchor"
DEFAULT_RETENTION_DAYS = 365 * 7
RETENTION_MODES = ("COMPLIANCE", "GOVERNANCE")


def chain_head(s: Session) -> dict[str, Any] | None:
    """The newest event: ``{"seq", "hash", "at", "action", "count"}``; None for an empty chain."""
    head = s.execute(
        select(AuditEvent.seq, AuditEvent.hash, AuditEvent.at, AuditEvent.action)
        .order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    if head is None:
        return None
    count = s.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
    return {"seq": head.seq, "hash": head.hash, "at": iso(head.at), "action": head.action, "count": count}


def object_lock_enabled(store) -> bool:
    """Whether the store's bucket has S3 Object Lock enabled (never for a local directory)."""
    if not isinstance(store, S3Store):
        return False
    from botocore.exceptions import ClientError

    try:
        config = store.client.get_object_lock_configuration(Bucket=store.bucket)
    except ClientError as exc:  # ObjectLockConfigurationNotFoundError, or a store without the API
        log.info("no object lock on %s (%s): anchors are written without retention", store.url, exc)
        return False
    return config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"


def _full_key(store: S3Store, key: str) -> str:
    return f"{store.prefix}/{key}" if store.prefix else key


def write_anchor(
    s: Session,
    store,
    *,
    retention_days: int = DEFAULT_RETENTION_DAYS,
    mode: str = "COMPLIANCE",
    actor: str = "system:audit-anchor",
    now: datetime | None = None,
) -> dict[str, Any] | None:
    """Write the current head as an anchor and record an ``audit.anchor`` event in ``s`` (the
    caller commits). Returns the anchor document with its ``key``; None when the chain is empty."""
    if mode not in RETENTION_MODES:
        raise ValueError(f"retention mode must be one of {', '.join(RETENTION_MODES)}, not {mode!r}")
    head = chain_head(s)
    if head is None:
        return None
    now = now or utcnow()
    locked = object_lock_enabled(store)
    retain_until = now + timedelta(days=retention_days)
    retention: dict[str, str | None] | str = (
        {"mode": mode, "retain_until": iso(retain_until)} if locked else "unsupported")
    doc = {"seq": head["seq"], "hash": head["hash"], "at": head["at"], "count": head["count"],
           "anchored_at": iso(now), "retention": retention}
    key = f"{ANCHOR_PREFIX}{now.astimezone(UTC):%Y%m%dT%H%M%S%fZ}-{head['seq']}.json"
    body = canonical_json(doc) + b"\n"
    if locked:
        # A direct PUT: the store's upload-then-copy path would not carry the retention over.
        store.client.put_object(Bucket=store.bucket, Key=_full_key(store, key), Body=body,
                                ContentType="application/json", ObjectLockMode=mode,
                                ObjectLockRetainUntilDate=retain_until)
    else:
        store.put_stream(key, io.BytesIO(body))
    record_audit(s, actor=actor, action=ANCHOR_ACTION, resource_type="audit_anchor", resource_id=key,
                 details={"seq": head["seq"], "hash": head["hash"], "retention": retention})
    return {**doc, "key": key}


# pg_try_advisory_xact_lock key of the anchor writer: one process anchors a given head.
ANCHOR_LOCK_KEY = int.from_bytes(hashlib.sha256(b"quantyard:audit-anchor").digest()[:8], "big", signed=True)
# How often API processes (and workers, when every_events is set) look whether an anchor is due.
CHECK_EVERY_S = 5.0


def _last_anchor(s: Session):
    """(seq, at) of the newest ``audit.anchor`` event, or None. Walks the primary key backwards
    and stops at the first anchor, which is at most ~every_events rows down."""
    return s.execute(select(AuditEvent.seq, AuditEvent.at)
                     .where(AuditEvent.resource_type == "audit_anchor", AuditEvent.action == ANCHOR_ACTION)
                     .order_by(AuditEvent.seq.desc()).limit(1)).first()


def _due(s: Session, *, interval_s: float, every_events: int, now: datetime) -> bool:
    head = s.execute(select(AuditEvent.seq, AuditEvent.action).order_by(AuditEvent.seq.desc()).limit(1)).first()
    if head is None or head.action == ANCHOR_ACTION:  # empty, or nothing new since the last anchor
        return False
    last = _last_anchor(s)
    if last is None:
        return interval_s > 0 or head.seq >= every_events > 0
    if every_events > 0 and head.seq - last.seq >= every_events:
        return True
    return interval_s > 0 and (now - last.at).total_seconds() >= interval_s


def _anchor_lock(s: Session) -> bool:
    if s.get_bind().dialect.name != "postgresql":
        return True
    return bool(s.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": ANCHOR_LOCK_KEY}).scalar())


def anchor_if_due(sessions: sessionmaker, store, *, interval_s: float, every_events: int = 0,
                  now: datetime | None = None, **kwargs) -> dict[str, Any] | None:
    """Anchor when events were added since the last anchor (an idle chain is not re-anchored: its
    head would be the last anchor's own event) and the last anchor is older than ``interval_s``
    (0: no time rule) or ``every_events`` events (0: no count rule) came after it. No anchor yet:
    anchored at once by the time rule, after ``every_events`` events by the count rule."""
    now = now or utcnow()
    _seal_first(sessions)
    with sessions() as s:
        if not _due(s, interval_s=interval_s, every_events=every_events, now=now):
            return None
        # Another process is anchoring, or anchored while we looked: check again under the lock.
        if not _anchor_lock(s) or not _due(s, interval_s=interval_s, every_events=every_events, now=now):
            s.rollback()
            return None
        anchor = write_anchor(s, store, now=now, **kwargs)
        s.commit()
        return anchor


def _seal_first(sessions: sessionmaker) -> None:
    """With deferred chaining, chain what is pending before looking at the head (audit_seal.py)."""
    with sessions() as s:
        deferred = is_deferred(s)
        engine = s.get_bind()
    if deferred:
        seal_pending(getattr(engine, "engine", engine), wait=True)


def anchor_on_shutdown(sessions: sessionmaker, store, **kwargs) -> dict[str, Any] | None:
    """Anchor any event added since the last anchor (a process that stops leaves no tail);
    failures are logged, never raised: a shutdown must go on."""
    try:
        anchor = anchor_if_due(sessions, store, interval_s=0.0, every_events=1, **kwargs)
    except Exception:  # noqa: BLE001
        log.exception("could not anchor the audit chain at shutdown")
        return None
    if anchor is not None:
        log.info("audit chain anchored at shutdown: seq %s (%s)", anchor["seq"], anchor["key"])
    return anchor


class AnchorWatcher:
    """A daemon thread that anchors when due (every ``CHECK_EVERY_S``) and once more on ``stop``.

    Used by API processes: the check (two index lookups) runs beside the requests, never in one."""

    def __init__(self, sessions: sessionmaker, store, *, interval_s: float, every_events: int,
                 check_every_s: float = CHECK_EVERY_S):
        self.sessions, self.store = sessions, store
        self.interval_s, self.every_events, self.check_every_s = interval_s, every_events, check_every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> AnchorWatcher:
        if self.interval_s > 0 or self.every_events > 0:
            self._thread = threading.Thread(target=self._run, name="audit-anchor", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        # Deferred chaining seals in its own thread (audit_seal.wake_sealer); anchor_if_due seals
        # what is pending before it looks at the head.
        while not self._stop.wait(self.check_every_s):
            try:
                anchor_if_due(self.sessions, self.store, interval_s=self.interval_s, every_events=self.every_events)
            except Exception:  # noqa: BLE001 - the next tick retries
                log.exception("audit anchor check failed")

    def stop(self, *, final_anchor: bool = True) -> dict[str, Any] | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return anchor_on_shutdown(self.sessions, self.store) if final_anchor else None


def _parse(key: str, raw: bytes, version_id: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
        seq, digest = int(doc["seq"]), str(doc["hash"])
    except (ValueError, KeyError, TypeError) as exc:
        # An unreadable anchor is reported, never skipped: it could hide a rewrite.
        return {"key": key, "version_id": version_id, "seq": None, "hash": None, "error": f"unreadable: {exc}"}
    return {**doc, "seq": seq, "hash": digest, "key": key, "version_id": version_id}


def _iter_s3_versions(store: S3Store) -> Iterator[dict[str, Any]]:
    from botocore.exceptions import ClientError

    prefix = _full_key(store, ANCHOR_PREFIX)
    strip = len(_full_key(store, ""))
    try:
        pages = store.client.get_paginator("list_object_versions").paginate(Bucket=store.bucket, Prefix=prefix)
        for page in pages:
            for v in page.get("Versions", []):
                body = store.client.get_object(Bucket=store.bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"]
                yield _parse(v["Key"][strip:], body.read(), v["VersionId"])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NotImplemented", "MethodNotAllowed"):
            raise
        for key in store.list_keys(ANCHOR_PREFIX):  # a store without versioning: the current objects
            yield _parse(key, b"".join(store.iter_bytes(key)), None)


def read_anchors(store) -> list[dict[str, Any]]:
    """Every anchor in the store, oldest key first. On S3 every stored version of every anchor is
    read, so overwriting an anchor (or hiding it behind a delete marker) does not hide the original."""
    if isinstance(store, S3Store):
        anchors = list(_iter_s3_versions(store))
    else:
        anchors = [_parse(k, b"".join(store.iter_bytes(k)), None) for k in store.list_keys(ANCHOR_PREFIX)
                   if k.endswith(".json")]
    return sorted(anchors, key=lambda a: (a["key"], a["version_id"] or ""))


def verify_with_anchors(s: Session, store, *, app_role: str | None = None) -> AuditVerification:
    """The whole chain, checked against every anchor in ``store``; an unreadable anchor fails.
    The database's protections are checked too (``verify_audit_chain``)."""
    anchors = read_anchors(store)
    bad = [a for a in anchors if a.get("error")]
    by_key: dict[str, set[tuple]] = {}
    for a in anchors:
        by_key.setdefault(a["key"], set()).add((a["seq"], a["hash"]))
    overwritten = sorted(k for k, versions in by_key.items() if len(versions) > 1)
    note = f"; anchor {overwritten[0]} has versions with different contents (overwritten)" if overwritten else ""
    result = verify_audit_chain(s, anchors=[a for a in anchors if not a.get("error")], app_role=app_role)
    if not result.ok:
        return replace(result, reason=(result.reason or "") + note)
    if bad:
        return replace(result, ok=False, problem="unreadable_anchor",
                       reason=f"anchor {bad[0]['key']} is {bad[0]['error']}")
    if overwritten:
        return replace(result, ok=False, problem="anchor_overwritten", reason=note[2:])
    return result


__all__ = [
    "ANCHOR_ACTION", "ANCHOR_PREFIX", "AnchorWatcher", "CHECK_EVERY_S", "DEFAULT_RETENTION_DAYS", "RETENTION_MODES",
    "anchor_if_due", "anchor_on_shutdown",
    "chain_head", "object_lock_enabled", "read_anchors", "verify_with_anchors", "write_anchor",
]
