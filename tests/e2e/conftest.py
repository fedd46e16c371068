"""Start the real thing as separate processes: API under uvicorn, Celery workers, `serve`.

Authentication is on, as in production: a stack that starts `quantyard api` first makes an admin
key with `quantyard keys create`; the embedded stack takes the bootstrap admin key that `quantyard
serve` prints on its first start. The key is in ``stack.env`` (QUANTYARD_API_KEY, for CLI calls)
and sent by ``stack.client()``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

READY_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The machine's environment without any QUANTYARD_* or AWS_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUANTYARD_", "AWS_"))}
    env.update(extra)
    return env


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    log_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def api_key(self) -> str | None:
        return self.env.get("QUANTYARD_API_KEY")

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def create_admin_key(self) -> str:
        """`quantyard keys create` on the stack's (migrated) catalog; the key goes into env."""
        made = subprocess.run([sys.executable, "-m", "quantyard.cli", "keys", "create", "--role", "admin",
                               "--name", "e2e-admin"], env=self.env, check=True, capture_output=True, text=True)
        self.env["QUANTYARD_API_KEY"] = made.stdout.strip()
        return self.env["QUANTYARD_API_KEY"]

    def _bootstrap_key_from_log(self) -> None:
        """The admin key `quantyard serve` printed on its first start."""
        log = self.log_dir / "serve.log"
        if self.api_key or not log.exists():
            return
        for line in log.read_text(errors="replace").splitlines():
            if "QUANTYARD_API_KEY=" in line:
                self.env["QUANTYARD_API_KEY"] = line.split("=", 1)[1].strip()

    def start(self, name: str, *args: str) -> subprocess.Popen:
        if args[:1] == ("api",) and not self.api_key:
            self.create_admin_key()
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "quantyard.cli", *args], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait_ready(self, *, workers: int = 1) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"a process exited with {proc.returncode}\n{self.logs()}")
            self._bootstrap_key_from_log()
            try:
                with self.client() as c:
                    ready = c.get("/readyz")
                    caps = c.get("/v1/capabilities").json()
                live = _live_cpu_workers(caps)
                last = f"readyz={ready.status_code} live cpu workers={live}"
                if ready.status_code == 200 and live >= workers:
                    return
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise RuntimeError(f"stack not ready after {READY_TIMEOUT_S}s ({last})\n{self.logs()}")


def _live_cpu_workers(caps: dict) -> int:
    for entry in caps.get("hardware_classes", []):
        if isinstance(entry, dict) and entry.get("name") == "cpu":
            return int(entry.get("live_workers", 0))
    return 0


@pytest.fixture(scope="session")
def production_stack(postgres_url, redis_url, s3_server, tmp_path_factory):
    """`quantyard db upgrade`, then `quantyard api` and a `quantyard worker` on Postgres,
    Redis and SeaweedFS's S3."""
    data_dir = tmp_path_factory.mktemp("prod-data")
    port = free_port()
    env = clean_env(
        QUANTYARD_DATABASE_URL=postgres_url,
        QUANTYARD_BROKER_URL=redis_url,
        QUANTYARD_STORAGE_URL=s3_server.storage_url,
        QUANTYARD_S3_ENDPOINT_URL=s3_server.endpoint_url,
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        AWS_DEFAULT_REGION="us-east-1",
        QUANTYARD_DATA_DIR=str(data_dir),
        QUANTYARD_PORT=str(port),
        QUANTYARD_WORKER_HEARTBEAT_S="1",
        QUANTYARD_JOB_LEASE_S="20",
    )
    yield from api_and_worker(env, port, data_dir)


def api_and_worker(env: dict[str, str], port: int, log_dir: Path):
    """`quantyard db upgrade`, then `quantyard api` and one cpu `quantyard worker` with this
    environment; yields the ready Stack and stops it afterwards (a fixture's body)."""
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, log_dir=log_dir)
    subprocess.run([sys.executable, "-m", "quantyard.cli", "db", "upgrade"], env=env, check=True,
                   capture_output=True)
    stack.start("api", "api")
    stack.start("worker", "worker", "--hardware-class", "cpu", "--loglevel", "info")
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory):
    """`quantyard serve` with an empty environment: SQLite, local objects, filesystem broker."""
    home = tmp_path_factory.mktemp("embedded-home")
    port = free_port()
    env = clean_env(HOME=str(home))
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, log_dir=home)
    stack.start("serve", "serve", "--port", str(port))
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def tiny_llama_archive(tiny_llama_dir, tmp_path_factory) -> Path:
    archive = tmp_path_factory.mktemp("archives") / "tiny-llama.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(Path(tiny_llama_dir).iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def upload(client: httpx.Client, archive: Path, name: str) -> dict:
    response = client.post("/v1/sources", params={"name": name}, content=archive.read_bytes(),
                           headers={"Content-Type": "application/gzip"})
    assert response.status_code == 201, response.text
    return response.json()


def wait_for_job(client: httpx.Client, job_id: str, *, timeout_s: float = 600,
                 until=("succeeded", "failed", "cancelled")) -> tuple[dict, list[dict]]:
    """Poll a job until it reaches one of `until`; returns it and every state seen on the way."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if not seen or (job["status"], job.get("progress")) != (seen[-1]["status"],
                                                                seen[-1].get("progress")):
            seen.append(job)
        if job["status"] in until:
            return job, seen
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not reach {until} in {timeout_s}s: {seen[-1:]}")
