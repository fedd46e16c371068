"""Telling a catalog outage from a failure of the work, and waiting for the catalog to return.

A task that cannot reach the catalog must not be failed and acked: its message is the only thing
that would run the job. The task keeps it instead (worker/celery_app.py: wait, then put it back
on the queue with a countdown), and the reconciler is the safety net for anything that still
slips through (a message acked when the broker was down too).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator

from sqlalchemy import exc as sa_exc
from sqlalchemy import text

log = logging.getLogger(__name__)

# Errors that say "the database did not answer", not "the statement was wrong".
_OUTAGE_TYPES = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                 sa_exc.TimeoutError)


class CatalogUnavailable(Exception):
    """The catalog could not be reached; the work was not done (or not recorded) and must be
    tried again later from its message."""


def is_catalog_outage(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it, a few links down) is the database being unreachable:
    a connection refused, reset or timed out, a statement or lock timeout, a pool timeout."""
    for _ in range(5):
        if exc is None:
            return False
        if isinstance(exc, CatalogUnavailable) or isinstance(exc, _OUTAGE_TYPES):
            return True
        if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def catalog_calls() -> Iterator[None]:
    """Turn a catalog outage inside the block into ``CatalogUnavailable``."""
    try:
        yield
    except CatalogUnavailable:
        raise
    except Exception as exc:
        if is_catalog_outage(exc):
            raise CatalogUnavailable(f"the catalog is unreachable: {type(exc).__name__}") from exc
        raise


def backoff_s(attempt: int, *, base_s: float = 1.0, cap_s: float = 30.0) -> float:
    """Exponential backoff with jitter: ~1, 2, 4 ... up to ``cap_s`` seconds."""
    return min(cap_s, base_s * 2 ** max(attempt, 0)) * random.uniform(0.5, 1.0)


def catalog_answers(sessions) -> bool:
    try:
        with sessions() as s:
            s.execute(text("SELECT 1"))
        return True
    except Exception as exc:  # noqa: BLE001 - any failure is "not yet"
        log.debug("catalog still unreachable: %s", exc)
        return False


def wait_for_catalog(sessions, *, budget_s: float, sleep=time.sleep) -> bool:
    """Block until the catalog answers a ``SELECT 1`` (True) or ``budget_s`` is spent (False),
    trying with backoff. Blocking here is the point: a worker process that waits takes no further
    messages from the queue, instead of spinning through them."""
    deadline = time.monotonic() + budget_s
    attempt = 0
    while True:
        if catalog_answers(sessions):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sleep(min(backoff_s(attempt), remaining))
        attempt += 1
