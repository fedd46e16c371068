"""Engines, sessions and migrations for the catalog."""

from __future__ import annotations

import logging
import select
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Postgres: how long opening a connection may take, and how long the liveness check of a pooled
# connection may wait for its answer. A frozen server (SIGSTOP, a hung host) accepts TCP but never
# answers: without these a request waits forever (the server-side statement_timeout cannot fire).
PG_CONNECT_TIMEOUT_S = 5
PG_PING_TIMEOUT_S = 3.0

log = logging.getLogger("quantyard.catalog")


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` select psycopg 3 (the driver the project installs)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def make_engine(url: str, *, connect_timeout_s: int = PG_CONNECT_TIMEOUT_S,
                statement_timeout_s: float | None = None, lock_timeout_s: float | None = None,
                ping_timeout_s: float = PG_PING_TIMEOUT_S, pool_timeout_s: float | None = None,
                **kwargs) -> Engine:
    """SQLite: WAL, busy timeout and foreign keys on every connection.

    Postgres: a connect timeout, and every pooled connection is checked on checkout with a
    ``SELECT 1`` that must answer within ``ping_timeout_s`` (pool_pre_ping's check, bounded: a
    dead or frozen server costs a fresh connection attempt, then an OperationalError, instead of
    a hang). ``statement_timeout_s`` / ``lock_timeout_s`` (None: the server's) bound each
    statement on the server side and ``pool_timeout_s`` the wait for a pooled connection; the
    API sets them (``engine_options``), migrations do not."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        if in_memory:
            kwargs.setdefault("poolclass", StaticPool)
        else:
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect(in_memory))
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg":
        return _postgres_engine(url, connect_timeout_s=connect_timeout_s, statement_timeout_s=statement_timeout_s,
                                lock_timeout_s=lock_timeout_s, ping_timeout_s=ping_timeout_s,
                                pool_timeout_s=pool_timeout_s, **kwargs)
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _postgres_engine(url: str, *, connect_timeout_s: int, statement_timeout_s: float | None,
                     lock_timeout_s: float | None, ping_timeout_s: float, pool_timeout_s: float | None,
                     **kwargs) -> Engine:
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("connect_timeout", max(int(connect_timeout_s), 2))  # libpq's minimum
    options = [f"-c {name}={int(seconds * 1000)}" for name, seconds in
               (("statement_timeout", statement_timeout_s), ("lock_timeout", lock_timeout_s)) if seconds]
    if options:
        connect_args["options"] = " ".join(filter(None, [connect_args.get("options"), *options]))
    if pool_timeout_s:
        kwargs.setdefault("pool_timeout", pool_timeout_s)
    # The bounded ping below replaces pool_pre_ping (whose SELECT 1 waits forever on a frozen server).
    kwargs.setdefault("pool_pre_ping", False)
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    if ping_timeout_s:
        event.listen(engine, "checkout", _timed_ping(ping_timeout_s))
    return engine


def _timed_ping(timeout_s: float):
    """A checkout listener: ``SELECT 1`` on the raw libpq connection, waiting at most
    ``timeout_s`` for the answer. Raising DisconnectionError makes the pool drop the connection and
    check out a fresh one (whose connect has its own timeout)."""

    def on_checkout(dbapi_connection, _record, _proxy) -> None:
        pgconn = getattr(dbapi_connection, "pgconn", None)
        if pgconn is None:  # not psycopg 3
            return
        try:
            _ping(pgconn, timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure means "this connection is unusable"
            log.warning("catalog connection failed its liveness check (%s: %s); reconnecting",
                        type(e).__name__, e)
            raise exc.DisconnectionError(f"liveness check failed: {type(e).__name__}") from None

    return on_checkout


def _ping(pgconn, timeout_s: float) -> None:
    """One simple query through libpq's asynchronous API, bounded by a deadline."""
    from psycopg import pq

    if pgconn.transaction_status != pq.TransactionStatus.IDLE:
        return  # mid-transaction (not the pool's doing): leave it alone
    deadline = time.monotonic() + timeout_s
    pgconn.send_query(b"SELECT 1")
    while pgconn.flush() != 0:  # the query is tiny: this is about a full socket buffer
        _wait(pgconn.socket, deadline, select.POLLOUT)
    ok = True
    while True:  # libpq's loop: read what arrived, take every complete result, else wait
        pgconn.consume_input()
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:  # ReadyForQuery: the connection is idle again
                if not ok:
                    raise RuntimeError("SELECT 1 failed")
                return
            ok = ok and result.status == pq.ExecStatus.TUPLES_OK
        _wait(pgconn.socket, deadline, select.POLLIN)


def _wait(sock: int, deadline: float, events: int) -> None:
    remaining = deadline - time.monotonic()
    poller = select.poll()
    poller.register(sock, events | select.POLLERR | select.POLLHUP)
    if remaining <= 0 or not poller.poll(remaining * 1000):
        raise TimeoutError("no answer from the catalog database")


def engine_options(settings) -> dict:
    """make_engine keyword arguments for a service process (the API): bounded statements, lock
    waits and pool waits, so a slow or frozen catalog answers 503 in seconds."""
    return {"connect_timeout_s": settings.db_connect_timeout_s,
            "statement_timeout_s": settings.db_statement_timeout_s,
            "lock_timeout_s": settings.db_lock_timeout_s,
            "pool_timeout_s": settings.db_pool_timeout_s}


def _sqlite_on_connect(in_memory: bool):
    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    return on_connect


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions keep loaded objects usable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """The Alembic script directory: ``migrations/`` beside the ``quantyard`` package
    (true both in a checkout and when installed, where ``migrations`` is a top-level package)."""
    import quantyard

    candidate = Path(quantyard.__file__).resolve().parent.parent / "migrations"
    if (candidate / "env.py").is_file():
        return candidate
    import importlib.util

    spec = importlib.util.find_spec("migrations")
    if spec is not None and spec.origin:
        found = Path(spec.origin).parent
        if (found / "env.py").is_file():
            return found
    raise RuntimeError("the catalog migrations directory was not found next to the quantyard package")


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # Passed as an attribute, not an ini option, so '%' in passwords needs no escaping.
    cfg.attributes["database_url"] = normalize_url(url)
    return cfg


def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations up to ``revision``; works from any working directory."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
