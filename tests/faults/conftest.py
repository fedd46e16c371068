"""The fault suite's stack: its own Postgres, Redis and S3 endpoint (tests/faults/services.py),
`quantyard api` and two `quantyard worker` processes with short leases, so a lost message, a dead
worker or an outage shows within seconds. One stack per session; every test starts from a healthy
stack (`faults`) and leaves it healthy (services up, two live workers).

Long variants are marked ``faults_long`` (scripts/faults.sh runs them); the rest is the CI slice.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import Stack, clean_env, free_port
from tests.faults.services import CutS3, OwnPostgres, OwnRedis, make_root, wait_until
from tests.fixtures.services import find_weed, service_unavailable

LEASE_S = 10
# What the stack is told (QUANTYARD_*): short leases and reconcile periods, a short S3 retry
# window, frequent sweeps with a short temp age, Celery's visibility timeout far above the test's
# horizon (task_time_limit + 600 s) so only the reconciler can bring a lost message back.
STACK_SETTINGS = {
    "QUANTYARD_JOB_LEASE_S": str(LEASE_S),
    "QUANTYARD_WORKER_HEARTBEAT_S": "1",
    "QUANTYARD_WORKER_STALE_AFTER_S": "6",
    "QUANTYARD_TASK_TIME_LIMIT_S": "300",
    "QUANTYARD_RECONCILE_INTERVAL_S": "2",
    "QUANTYARD_RECONCILE_GRACE_S": "4",
    "QUANTYARD_CATALOG_WAIT_S": "90",
    "QUANTYARD_STORAGE_RETRY_S": "12",
    "QUANTYARD_WORKER_SWEEP_INTERVAL_S": "2",
    "QUANTYARD_STORAGE_TEMP_MAX_AGE_S": "15",
    "QUANTYARD_AUDIT_ANCHOR_INTERVAL_S": "0",
    "QUANTYARD_RETENTION_PURGE_INTERVAL_S": "0",
}


def pytest_collection_modifyitems(config, items):
    """The long variants run only when asked for (scripts/faults.sh sets QUANTYARD_FAULTS_LONG=1,
    or -m names faults_long): the plain suite run (.ci/run) keeps to the CI slice."""
    if os.environ.get("QUANTYARD_FAULTS_LONG") == "1" or "faults_long" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long fault variant: scripts/faults.sh (QUANTYARD_FAULTS_LONG=1)")
    for item in items:
        if item.get_closest_marker("faults_long"):
            item.add_marker(skip)


@dataclass
class FaultStack:
    stack: Stack
    pg: OwnPostgres
    redis: OwnRedis
    s3: CutS3
    data_dir: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    # processes ----------------------------------------------------------------------------
    def start_worker(self, name: str) -> subprocess.Popen:
        proc = self.stack.start(name, "worker", "--hardware-class", "cpu", "--loglevel", "info")
        self.workers[name] = proc
        return proc

    def kill_worker(self, name: str) -> None:
        """SIGKILL the whole worker: main process and its pool (one process group)."""
        proc = self.workers[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
        self.stack.processes.remove(proc)

    def pool_process(self, name: str, timeout_s: float = 30) -> psutil.Process:
        main = psutil.Process(self.workers[name].pid)
        return wait_until(lambda: (main.children(recursive=False) or [None])[0], timeout_s=timeout_s,
                          what=f"a pool process of {name}")

    def worker_running(self, *, status_of) -> str | None:
        """The name of a worker whose pool process has a target or job in progress, judged by
        the catalog's lease owner (worker ids are host:pid:class, pid = the main process)."""
        owner = status_of()
        for name, proc in self.workers.items():
            if owner and f":{proc.pid}:" in owner:
                return name
        return None

    def ensure_healthy(self) -> None:
        """Every service up and two live workers, whatever the previous test did."""
        self.s3.restore()
        if not self.pg.is_up():
            self.pg.thaw()
            if not self.pg.is_up():
                self.pg.start()
        try:
            self.redis.ping()
        except Exception:  # noqa: BLE001
            self.redis.start()
        for name, proc in list(self.workers.items()):
            if proc.poll() is not None:
                if proc in self.stack.processes:
                    self.stack.processes.remove(proc)
                self.start_worker(name)
        self.stack.wait_ready(workers=2)

    # catalog ------------------------------------------------------------------------------
    def sql(self, query: str, **params) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.pg.url().replace("+psycopg", ""), connect_timeout=5) as conn:
            return conn.execute(query, params).fetchall()

    def scratch_leftovers(self) -> list[str]:
        """job_*/tgt_* folders under the shared scratch base (inside any process's folder)."""
        base = self.data_dir / "scratch"
        return sorted(str(p.relative_to(base)) for p in base.glob("*/*") if p.is_dir())

    def dead_scratch_owners(self) -> list[str]:
        from worker.scratch import is_dead_owner

        base = self.data_dir / "scratch"
        return sorted(p.name for p in base.iterdir() if p.is_dir() and is_dead_owner(p.name))

    def log_marks(self) -> dict[Path, int]:
        return {p: p.stat().st_size for p in self.data_dir.glob("*.log")}

    def logs_since(self, marks: dict[Path, int]) -> str:
        """What every process logged after `marks` (log_marks())."""
        parts = []
        for path in sorted(self.data_dir.glob("*.log")):
            with path.open("rb") as f:
                f.seek(marks.get(path, 0))
                parts.append(f.read().decode(errors="replace"))
        return "\n".join(parts)

    def note(self, line: str) -> None:
        self.lines.append(line)


def _require_tools() -> None:
    missing = [what for what, ok in (
        ("Postgres 15 binaries",
         (Path(os.environ.get("QUANTYARD_TEST_PG_BIN", "/usr/lib/postgresql/15/bin")) / "initdb").exists()),
        ("redis-server", shutil.which("redis-server") is not None),
        ("weed", find_weed() is not None)) if not ok]
    if missing:
        service_unavailable("the fault suite's own services", ", ".join(missing) + " not found")


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory):
    _require_tools()
    root = make_root("quantyard-faults-")
    pg, redis, s3 = OwnPostgres(root / "pg"), OwnRedis(root / "redis"), CutS3(root / "s3")
    data_dir = tmp_path_factory.mktemp("faults-data")
    started = time.monotonic()
    stack = None
    try:
        pg.init()
        redis.start()
        s3.start()
        port = free_port()
        env = clean_env(QUANTYARD_DATABASE_URL=pg.url(), QUANTYARD_BROKER_URL=redis.url,
                        QUANTYARD_DATA_DIR=str(data_dir), QUANTYARD_PORT=str(port), **s3.env,
                        **STACK_SETTINGS)
        stack = Stack(url=f"http://127.0.0.1:{port}", env=env, log_dir=data_dir)
        subprocess.run([sys.executable, "-m", "quantyard.cli", "db", "upgrade"], env=env, check=True,
                       capture_output=True)
        stack.start("api", "api")
        fs = FaultStack(stack=stack, pg=pg, redis=redis, s3=s3, data_dir=data_dir)
        fs.start_worker("worker-a")
        fs.start_worker("worker-b")
        stack.wait_ready(workers=2)
        fs.note(f"stack up in {time.monotonic() - started:.1f}s")
        yield fs
    finally:
        if stack is not None:
            stack.stop()
        s3.stop()
        redis.kill()
        pg.destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def faults(fault_stack, capsys, request):
    """The healthy session stack; the test's timing lines are printed when it ends."""
    fault_stack.ensure_healthy()
    fault_stack.lines.clear()
    started = time.monotonic()
    yield fault_stack
    with capsys.disabled():
        print(f"\n[{request.node.name}] {time.monotonic() - started:.1f}s")
        for line in fault_stack.lines:
            print(f"  {line}")


# --------------------------------------------------------------------------------- jobs & models


@pytest.fixture(scope="session")
def fault_model(tmp_path_factory) -> Path:
    """The suite's own tiny Llama, built here rather than shared from .test-cache: another
    suite rewriting a cached file mid-run must not turn a fault scenario into invalid_model."""
    from tests.fixtures.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("fault-model") / "tiny-llama", seed=11)


@pytest.fixture(scope="session")
def fresh_archive(fault_model, tmp_path_factory):
    """A factory of tiny-Llama archives with distinct bytes (a nonce file): no job reuses
    another's artifacts (recipes hash the source's sha256), so every job really converts."""
    tiny_llama_dir = fault_model
    folder = tmp_path_factory.mktemp("fault-archives")

    def make() -> Path:
        nonce = uuid.uuid4().hex
        path = folder / f"tiny-{nonce[:8]}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for item in sorted(Path(tiny_llama_dir).iterdir()):
                tar.add(item, arcname=item.name)
            data = f"fault-suite nonce {nonce}\n".encode()
            info = tarfile.TarInfo("NONCE.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return path

    return make
