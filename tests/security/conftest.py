"""A real embedded stack (`quantyard serve`, one per module) watched from outside: the worker's
PID, the RSS of the API and of the worker's process tree, its scratch and upload folders, its
object store and catalog rows.

A hostile case that drives the worker past KILL_RSS_BYTES has it killed here (the machine is
shared; the case has failed anyway) and the next case gets a fresh stack.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import Stack, clean_env, free_port

# Measured on the embedded stack with these cases (2 cores, 2026-12-03): the worker's tree (celery
# main + pool process + any sandbox child) 150 MiB idle, 520-680 MiB once torch and onnxruntime are
# loaded, 950 MiB at most (a 1M-token tokenizer.json); the API 96-111 MiB, growing at most 5 MiB in
# a case (bodies and headers are refused before they are read). Before issue 10's fixes a layer bomb
# took the worker past 15 GB and a million-member zip cost the API 646 MB.
WORKER_RSS_BOUND = 3 << 30
API_RSS_BOUND = 1 << 30
API_RSS_GROWTH_BOUND = 300 << 20  # over the API's RSS before the case: no body or header in memory
KILL_RSS_BYTES = 5 << 30
# A worker process's own scratch folder (worker/scratch.py): its job_*/tgt_* folders must go.
_OWNER_FOLDER = re.compile(r"-p\d+-\d+$")


@dataclass
class Peak:
    worker: int = 0
    api: int = 0
    api_before: int = 0
    killed: str | None = None


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class RssWatch:
    """Samples the API process and the worker's tree every 50 ms while a case runs."""

    def __init__(self, api: psutil.Process, worker: psutil.Process) -> None:
        self.api, self.worker = api, worker
        self.peak = Peak(api_before=api.memory_info().rss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self.peak

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worker = _tree_rss(self.worker)
                api = self.api.memory_info().rss
            except psutil.Error:
                return
            self.peak.worker = max(self.peak.worker, worker)
            self.peak.api = max(self.peak.api, api)
            if worker > KILL_RSS_BYTES and not self.peak.killed:
                self.peak.killed = f"worker tree at {worker >> 20} MiB: killed to protect the machine"
                for p in [self.worker, *self.worker.children(recursive=True)]:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
            self._stop.wait(0.05)


@dataclass
class HostileStack:
    stack: Stack
    home: Path
    worker_pid: int = 0
    measurements: list[dict] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.home / ".quantyard"

    @property
    def scratch(self) -> Path:
        return self.data_dir / "scratch"

    @property
    def uploads(self) -> Path:
        return self.data_dir / "tmp" / "uploads"

    @property
    def serve(self) -> psutil.Process:
        return psutil.Process(self.stack.processes[0].pid)

    def worker(self) -> psutil.Process | None:
        """The `quantyard worker` process that `serve` started (None when it is gone)."""
        try:
            for child in self.serve.children():
                if "worker" in child.cmdline():
                    return child
        except psutil.Error:
            pass
        return None

    def alive(self) -> bool:
        return self.stack.processes[0].poll() is None and self.worker() is not None

    def watch(self) -> RssWatch:
        return RssWatch(self.serve, self.worker())

    def objects(self) -> set[str]:
        """The store's objects but the audit anchors: the API writes one every N audit events of
        the shared stack (AnchorWatcher), whichever case happens to cross N; no upload makes one."""
        root = self.data_dir / "objects"
        if not root.exists():
            return set()
        return {key for p in root.rglob("*") if p.is_file()
                and not (key := p.relative_to(root).as_posix()).startswith("audit-anchors/")}

    def source_rows(self) -> int:
        db = sqlite3.connect(f"file:{self.data_dir / 'catalog.db'}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute("SELECT count(*) FROM sources").fetchone()[0]
        finally:
            db.close()

    def leftovers(self, timeout_s: float = 10.0) -> list[str]:
        """What is still in the scratch and upload folders after up to `timeout_s`: any job or
        target folder inside a worker process's own scratch folder (`<host>-p<pid>-<start>`, which
        itself stays while its process lives), anything else at the top of scratch, any upload."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = [f"tmp/uploads/{p.name}" for p in self.uploads.glob("*")]
            for entry in self.scratch.glob("*"):
                if _OWNER_FOLDER.search(entry.name) and entry.is_dir():
                    left += [f"scratch/{entry.name}/{p.name}" for p in entry.iterdir()]
                else:
                    left.append(f"scratch/{entry.name}")
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)


def _start(home: Path) -> HostileStack:
    port = free_port()
    env = clean_env(HOME=str(home), QUANTYARD_WORKER_HEARTBEAT_S="1")
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, log_dir=home)
    stack.start("serve", "serve", "--port", str(port))
    stack.wait_ready()
    hostile = HostileStack(stack, home)
    deadline = time.monotonic() + 30
    while hostile.worker() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    hostile.worker_pid = hostile.worker().pid
    return hostile


@pytest.fixture(scope="module")
def hostile_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-home")


@pytest.fixture(scope="module")
def _hostile_stack(hostile_home):
    holder = {"stack": _start(hostile_home)}
    try:
        yield holder
    finally:
        stack = holder["stack"]
        stack.stack.stop()
        for m in stack.measurements:
            print(f"[hostile] {m['case']}: {m['outcome']} worker peak {m['worker_mib']} MiB, "
                  f"API peak {m['api_mib']} MiB (+{m['api_growth_mib']}), {m['seconds']} s")


@pytest.fixture
def hostile_stack(_hostile_stack) -> HostileStack:
    """The module's stack; restarted (same home, same catalog) when an earlier case killed it."""
    stack = _hostile_stack["stack"]
    if not stack.alive():
        stack.stack.stop()
        fresh = _start(stack.home)
        fresh.stack.env["QUANTYARD_API_KEY"] = stack.stack.api_key
        fresh.measurements = stack.measurements
        _hostile_stack["stack"] = stack = fresh
    return stack
