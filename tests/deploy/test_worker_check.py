"""The worker probe (`quantyard worker-check`): fresh heartbeat of a worker on this host or exit 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from quantyard import catalog
from quantyard.worker_check import fresh_heartbeats


def _beat(url: str, *, worker_id: str, hostname: str, hardware_class: str = "cpu", age_s: float = 0.0) -> None:
    engine = catalog.make_engine(url)
    try:
        with catalog.make_session_factory(engine).begin() as s:
            catalog.worker_heartbeat(s, worker_id=worker_id, hostname=hostname, hardware_class=hardware_class,
                                     capabilities={})
            if age_s:
                s.flush()
                s.execute(update(catalog.Worker).where(catalog.Worker.id == worker_id).values(
                    last_heartbeat_at=datetime.now(UTC) - timedelta(seconds=age_s)))
    finally:
        engine.dispose()


def test_only_this_hosts_fresh_workers_count(catalog_url):
    here = socket.gethostname()
    _beat(catalog_url, worker_id="other:1:cpu", hostname="another-pod")
    _beat(catalog_url, worker_id=f"{here}:2:cpu", hostname=here, age_s=600)
    assert fresh_heartbeats(database_url=catalog_url, hostname=here, stale_after_s=60) == []
    _beat(catalog_url, worker_id=f"{here}:3:cuda", hostname=here, hardware_class="cuda")
    assert fresh_heartbeats(database_url=catalog_url, hostname=here, stale_after_s=60) == [f"{here}:3:cuda"]
    assert fresh_heartbeats(database_url=catalog_url, hostname=here, stale_after_s=60, hardware_class="cpu") == []


def _probe(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUANTYARD_DATABASE_URL": url}
    return subprocess.run([sys.executable, "-m", "quantyard.worker_check", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_probe_exit_codes(tmp_path):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog.upgrade_database(url)
    missing = _probe(url)
    assert missing.returncode == 1 and "no fresh heartbeat" in missing.stderr
    _beat(url, worker_id=f"{socket.gethostname()}:9:cpu", hostname=socket.gethostname())
    ok = _probe(url, "--hardware-class", "cpu")
    assert ok.returncode == 0, ok.stderr
    down = _probe("postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert down.returncode == 1 and "catalog unreachable" in down.stderr
