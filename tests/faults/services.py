"""Services the fault suite may stop, kill and freeze: its own Postgres cluster, its own Redis and
an S3 endpoint it can cut. Never the machine's shared Postgres (5432) or Redis (6379).

- ``OwnPostgres``: initdb + pg_ctl (``/usr/lib/postgresql/15/bin`` or ``QUANTYARD_TEST_PG_BIN``)
  into a temporary folder on a free port; run as the ``postgres`` user when the tests run as root
  (Postgres refuses root). stop() is ``pg_ctl stop -m fast``; freeze() SIGSTOPs every process of
  the cluster.
- ``OwnRedis``: ``redis-server`` on a free port without persistence (``--save "" --appendonly no``,
  how most people run it): kill() loses every message.
- ``CutS3``: ``weed mini`` (tests/fixtures/services.py) behind a TCP proxy on a fixed port: cut()
  refuses new connections and resets open ones, which is what a client sees of a dead S3 server;
  restore() serves again with the data intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from tests.faults.tcp_proxy import CuttableProxy
from tests.fixtures.services import S3Server, start_weed_mini, stop_weed

PG_BIN = Path(os.environ.get("QUANTYARD_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, *, timeout_s: float, interval_s: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the service may be between states
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached in {timeout_s:.0f}s (last error: {last_error!r})")


class OwnPostgres:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "pgdata"
        self.port = free_port()
        self.log = self.root / "postgres.log"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str = "quantyard") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                       "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
        self.start()
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "quantyard"')

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop", check=False)

    def is_up(self) -> bool:
        return self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False).returncode == 0

    def _processes(self) -> list[psutil.Process]:
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return []
        main = psutil.Process(int(pid_file.read_text().split()[0]))
        return [main, *main.children(recursive=True)]

    def freeze(self) -> None:
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)

    def destroy(self) -> None:
        self.thaw()
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


class OwnRedis:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_until(self.ping, timeout_s=20, what="redis up")

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)

    def ping(self) -> bool:
        with contextlib.closing(self.client()) as c:
            return bool(c.ping())

    def kill(self) -> None:
        """SIGKILL: no persistence, so every queued message is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def queue_lengths(self) -> dict[str, int]:
        with contextlib.closing(self.client()) as c:
            return {k.decode(): c.llen(k) for k in c.keys("convert.*") if c.type(k) == b"list"}


class CutS3:
    """weed mini behind a proxy: `endpoint_url` is the proxy's, which outlives cuts."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.server: S3Server | None = None
        self.proxy: CuttableProxy | None = None

    def start(self) -> None:
        errors = []
        for attempt in range(3):  # a port picked as free may be taken before weed binds it
            try:
                self.server = start_weed_mini(self.root / f"run{attempt}")
                break
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        if self.server is None:
            raise RuntimeError(f"weed mini did not start: {errors[-1]}")
        endpoint = self.server.endpoint_url.rsplit(":", 1)
        self.proxy = CuttableProxy("127.0.0.1", int(endpoint[1]))

    @property
    def endpoint_url(self) -> str:
        return self.proxy.url

    @property
    def env(self) -> dict[str, str]:
        return dict(self.server.env, QUANTYARD_S3_ENDPOINT_URL=self.endpoint_url)

    def cut(self) -> None:
        self.proxy.cut()

    def restore(self) -> None:
        self.proxy.restore()

    def client(self):
        """A client straight to the server (not through the proxy): the test's own view."""
        return self.server.client()

    def keys(self, prefix: str = "") -> list[str]:
        client, keys = self.client(), []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.server.bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)

    def open_uploads(self) -> list[str]:
        uploads = self.client().list_multipart_uploads(Bucket=self.server.bucket).get("Uploads", [])
        return [u["Key"] for u in uploads]

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        if self.server is not None:
            stop_weed(self.server._proc)


def make_root(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root
