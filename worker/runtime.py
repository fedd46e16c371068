"""Per-process resources of a worker: catalog sessions, object store, scratch space.

Created lazily inside the process that runs tasks (after Celery forks its pool), never at import.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sqlalchemy.orm import Session, sessionmaker

from quantyard import catalog
from quantyard.catalog.audit_seal import defer_chaining
from quantyard.settings import Settings, get_settings
from quantyard.storage import ObjectStore, open_store
from worker.scratch import process_scratch_dir, scratch_base


@dataclass
class WorkerRuntime:
    settings: Settings
    sessions: sessionmaker
    store: ObjectStore
    worker_id: str
    scratch_dir: Path

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as s:
            yield s


def worker_identity(hardware_class: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{hardware_class}"


def build_runtime(settings: Settings | None = None, *, worker_id: str | None = None) -> WorkerRuntime:
    settings = settings or get_settings()
    engine = catalog.make_engine(settings.resolved_database_url)
    defer_chaining(engine, settings.audit_chain == "deferred")  # QUANTYARD_AUDIT_CHAIN (audit_seal.py)
    # This process's own folder: what a SIGKILLed process leaves is swept (worker/scratch.py).
    scratch = process_scratch_dir(scratch_base(settings))
    return WorkerRuntime(
        settings=settings,
        sessions=catalog.make_session_factory(engine),
        store=open_store(
            settings.resolved_storage_url,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            retry_s=settings.storage_retry_s,
        ),
        worker_id=worker_id or worker_identity("cpu"),
        scratch_dir=scratch,
    )


_RUNTIME: dict[int, WorkerRuntime] = {}


def runtime_for_this_process(worker_id: str | None = None) -> WorkerRuntime:
    """One runtime per OS process: database connections must not cross a fork."""
    pid = os.getpid()
    if pid not in _RUNTIME:
        _RUNTIME.clear()
        _RUNTIME[pid] = build_runtime(worker_id=worker_id)
    return _RUNTIME[pid]
