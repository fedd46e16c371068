"""Deferred chaining: audit events written beside the change, sealed into the chain in batches.

Direct chaining (the default, and always on SQLite) appends each event to ``audit_events`` in the
change's transaction under the chain lock, so every audited write in the whole service waits for
the previous one to *commit* (its WAL flush included): one writer at a time.

Deferred chaining (``QUANTYARD_AUDIT_CHAIN=deferred``, Postgres; ``defer_chaining(engine)``):

- ``record_audit`` INSERTs the event into ``audit_pending`` in the change's transaction, without
  the lock. The change and its event commit together or not at all (fail closed as before).
- That commit wakes the process's *sealer* (a daemon thread per process and engine, started on
  the first deferred commit; never the request's own thread, so a submission pays for its own
  change only). The sealer gathers for ``SEAL_GATHER_S``, then tries the chain lock and, when it
  gets it, *seals*: in one transaction it reads every committed pending event (``pending_seq``
  order), computes seq / prev_hash / hash from the chain head exactly as a direct append would,
  INSERTs them into ``audit_events`` and deletes them from ``audit_pending``. One seal chains
  everything committed meanwhile, in every process (a batch), so the lock is held once per batch,
  not once per write. A busy lock (another process sealing) is retried every ``SEAL_EVERY_S``;
  every process also seals before each anchor check and at shutdown. So an event is chained
  within about ``SEAL_GATHER_S`` while its process runs, or by any later seal.
- Until sealed, an event is protected by the migration 0009 triggers only: nobody may UPDATE a
  pending event and one may be deleted only once an event with its id is in the chain. Once
  sealed it has every guarantee of a direct event: the hash chain, ``verify``, the anchors.
  ``verify`` reports how many events are still pending (``pending``).

Order: the chain is in seal order, which follows commit order closely; ``at`` is the time of the
change, so it may step back slightly from one seq to the next.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import cast

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.orm import Session

from .models import GENESIS_HASH, AuditEvent, Base, JSONType, UTCDateTime, hashed_fields

log = logging.getLogger("quantyard.catalog.audit")

AUDIT_PENDING = Table(
    "audit_pending", Base.metadata,
    Column("pending_seq", BigInteger().with_variant(Integer, "sqlite"), autoincrement=True, nullable=False),
    Column("id", String(40), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(100), nullable=False),
    Column("resource_type", String(50), nullable=False),
    Column("resource_id", String(200)),
    Column("outcome", String(50), nullable=False),
    Column("request_id", String(200)),
    Column("source_ip", String(100)),
    Column("user_agent", Text()),
    Column("details", JSONType, nullable=False),
    Column("organization_id", String(40)),
    PrimaryKeyConstraint("pending_seq"),
    UniqueConstraint("id"),
)
EVENT_COLUMNS = tuple(c.name for c in AUDIT_PENDING.columns if c.name != "pending_seq")

SEAL_BATCH = 2000
SEAL_EVERY_S = 0.1
# How long a woken sealer waits for more commits before sealing them together.
SEAL_GATHER_S = 0.1
# The longest wait between two tries while sealing fails (the catalog is down).
SEAL_RETRY_MAX_S = 5.0
# The session flag record_audit sets when it wrote a pending event (sealed after the commit).
PENDING_FLAG = "quantyard_audit_pending"

_deferred: weakref.WeakSet[Engine] = weakref.WeakSet()


def defer_chaining(engine: Engine, enabled: bool = True) -> None:
    """Make ``record_audit`` on sessions of ``engine`` write pending events (Postgres only)."""
    if enabled and engine.dialect.name == "postgresql":
        _deferred.add(engine)
    else:
        _deferred.discard(engine)


def _engine_of(s: Session) -> Engine:
    """The engine behind a session (bound to an engine or to one of its connections)."""
    bind = s.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


def is_deferred(s: Session) -> bool:
    return _engine_of(s) in _deferred


def pending_count(s: Session) -> int:
    if s.get_bind().dialect.name != "postgresql":
        return 0
    return s.execute(select(func.count()).select_from(AUDIT_PENDING)).scalar_one()


# One sealer per process at a time: a thread that finds another sealing skips the database
# round trips (the one sealing goes round again while it finds events, and takes this one's).
_local_sealer = threading.Lock()


class _Sealer:
    """The background sealer of one engine in one process: sleeps until a deferred commit wakes
    it, gathers for SEAL_GATHER_S (a batch), seals; retries every SEAL_EVERY_S while a busy lock
    or a failure leaves events behind.

    It seals on a connection of its own, held while it runs (a pooled one checked out per round
    could come back into a pool that ``engine.dispose()`` had already emptied). ``dispose()``
    stops it (the ``engine_disposed`` event): the thread finishes its round, closes that
    connection and exits, so no connection outlives a dispose (a database copied as a template
    next must have none)."""

    def __init__(self, engine: Engine):
        self._engine = weakref.ref(engine)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.behind = False
        self.pid = os.getpid()
        self._conn: Connection | None = None
        event.listen(engine, "engine_disposed", self._on_dispose)
        self.thread = threading.Thread(target=self._run, name="audit-sealer", daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.pid != os.getpid():  # a forked child's copy: the thread and connection are the parent's
            return
        self.stopping.set()
        self.wake.set()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout_s)

    def _on_dispose(self, engine: Engine) -> None:
        with _sealers_lock:
            if _sealers.get(id(engine)) is self:
                del _sealers[id(engine)]
        self.stop()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._close()

    def _loop(self) -> None:
        retry_s = SEAL_EVERY_S
        while not self.stopping.is_set():
            woken = self.wake.wait(retry_s)
            engine = self._engine()
            if self.stopping.is_set() or engine is None or engine not in _deferred:
                return  # disposed of, or chaining made direct again
            if not woken and not self.behind:
                continue
            if woken and self.stopping.wait(SEAL_GATHER_S):
                return
            self.wake.clear()
            try:
                self.behind = self._seal(engine) is None
                retry_s = SEAL_EVERY_S
            except Exception as exc:  # noqa: BLE001 - the events are committed; a later round retries
                self._close()
                self.behind = True
                retry_s = min(retry_s * 2, SEAL_RETRY_MAX_S)  # an unreachable catalog: back off
                log.warning("sealing pending audit events failed (%s: %s); retrying in %.1f s",
                            type(exc).__name__, exc, retry_s)

    def _seal(self, engine: Engine) -> int | None:
        if not _local_sealer.acquire(blocking=False):
            return None  # another thread of this process is sealing (it takes these events too)
        try:
            if self._conn is None:
                self._conn = engine.connect()
            return _seal_rounds(self._conn, wait=False, rounds=10)
        finally:
            _local_sealer.release()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.invalidate()  # closes the DBAPI connection itself, not back into a pool
            conn.close()
        except Exception:  # noqa: BLE001 - it is being thrown away
            log.debug("closing the sealer's connection failed", exc_info=True)


_sealers: dict[int, _Sealer] = {}
_sealers_lock = threading.Lock()


def wake_sealer(engine: Engine) -> None:
    """Have this process's sealer chain what ``engine``'s sessions committed (started on first
    use, and again in a forked child, which inherits the dictionary but not the thread)."""
    key = id(engine)
    sealer = _sealers.get(key)
    if sealer is None or sealer.pid != os.getpid() or sealer._engine() is not engine:
        with _sealers_lock:
            sealer = _sealers.get(key)
            if sealer is None or sealer.pid != os.getpid() or sealer._engine() is not engine:
                sealer = _sealers[key] = _Sealer(engine)
    sealer.wake.set()


def seal_pending(engine: Engine, *, wait: bool = False, rounds: int = 10) -> int | None:
    """Chain every committed pending event; returns how many were sealed, or None when the lock
    was busy (``wait=False``: another sealer or a direct append holds it)."""
    if not _local_sealer.acquire(blocking=wait):
        return None
    try:
        with engine.connect() as conn:
            return _seal_rounds(conn, wait=wait, rounds=rounds)
    finally:
        _local_sealer.release()


def seal_before_read(s: Session, *, timeout_s: float = 2.0) -> None:
    """Readers of the chain (audit listings, exports) see what was committed before they asked:
    chain what is pending first. Bounded: a lock held past ``timeout_s`` (a long seal elsewhere)
    leaves the read to show what is chained so far. Any Postgres reader does it, whatever its own
    chaining mode: other processes may have left events pending. Best effort: a reader that may
    not append to the chain still reads it."""
    engine = _engine_of(s)
    if engine.dialect.name != "postgresql":
        return
    deadline = time.monotonic() + timeout_s
    try:
        while seal_pending(engine) is None and time.monotonic() < deadline:
            time.sleep(SEAL_GATHER_S / 5)
    except Exception as exc:  # noqa: BLE001 - reading must not fail because sealing did
        log.warning("could not chain pending audit events before a read: %s: %s", type(exc).__name__, exc)


def _seal_rounds(conn: Connection, *, wait: bool, rounds: int) -> int | None:
    from .audit import AUDIT_LOCK_KEY  # audit.py imports this module

    total = 0
    for _ in range(rounds):
        with conn.begin():
            if wait:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": AUDIT_LOCK_KEY})
            elif not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": AUDIT_LOCK_KEY}).scalar():
                return total or None
            n = _seal_batch(conn)
        total += n
        if n < SEAL_BATCH:  # everything visible is chained; a commit after this snapshot wakes the sealer again
            return total
    return total


def _seal_batch(conn) -> int:
    """One statement reads the head and the batch (after the lock: a snapshot taken before it could
    miss the previous sealer's head), one inserts the chained events, one removes them."""
    head = (select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
            .subquery().lateral("head"))
    batch = (select(AUDIT_PENDING, head.c.seq.label("head_seq"), head.c.hash.label("head_hash"))
             .select_from(AUDIT_PENDING).outerjoin(head, text("true"))
             .order_by(AUDIT_PENDING.c.pending_seq).limit(SEAL_BATCH))
    rows = conn.execute(batch).mappings().all()
    if not rows:
        return 0
    first = rows[0]
    seq, prev_hash = ((first["head_seq"], first["head_hash"]) if first["head_seq"] is not None
                      else (0, GENESIS_HASH))
    from .audit import event_hash

    events = []
    for row in rows:
        seq += 1
        fields = {c: row[c] for c in EVENT_COLUMNS}
        fields.update(seq=seq, prev_hash=prev_hash)
        fields["hash"] = prev_hash = event_hash(hashed_fields(fields))
        events.append(fields)
    conn.execute(insert(cast(Table, AuditEvent.__table__)), events)
    conn.execute(delete(AUDIT_PENDING).where(AUDIT_PENDING.c.pending_seq.in_([r["pending_seq"] for r in rows])))
    return len(rows)


@event.listens_for(Session, "after_commit")
def _seal_after_commit(session: Session) -> None:
    """A commit that wrote pending events wakes the sealer (the session can't run SQL here, and
    the request should not wait for the chain: the event is already durable in audit_pending)."""
    if not session.info.pop(PENDING_FLAG, False):
        return
    wake_sealer(_engine_of(session))


@event.listens_for(Session, "after_rollback")
def _forget_pending(session: Session) -> None:
    session.info.pop(PENDING_FLAG, None)


__all__ = ["AUDIT_PENDING", "PENDING_FLAG", "SEAL_EVERY_S", "SEAL_GATHER_S", "defer_chaining", "is_deferred",
           "pending_count", "seal_before_read", "seal_pending", "wake_sealer"]
