"""Run deployment definitions (rendered Kubernetes containers, docker-compose services) as local
processes: one-off steps, long-running services, their probes, a job through them.

What a container sees at a path (a volume, the image's virtual environment) is a local folder
here; ``map_paths`` rewrites the environment's values accordingly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.deploy import render
from tests.deploy.k8s_walk import container_env, find, pod_spec
from tests.e2e.conftest import clean_env, free_port, upload, wait_for_job

ENTRYPOINT = render.ROOT / "deploy" / "entrypoint.sh"
METRICS_TOKEN = "manifest-test-metrics-token-0123456789"


def map_paths(value: str, mounts: dict[str, Path]) -> str:
    """``value`` with each container path under a mount replaced by its local folder; the parts
    of a colon-separated list (PATH) each on their own."""
    parts = value.split(":")
    for i, part in enumerate(parts):
        for mount_path, folder in mounts.items():
            if part == mount_path or part.startswith(mount_path.rstrip("/") + "/"):
                parts[i] = str(folder) + part[len(mount_path):]
                break
    return ":".join(parts)


class LocalProcesses:
    """The processes of one stack, each logging to ``<workdir>/<name>.log``."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []

    def run(self, name: str, command: list[str], env: dict[str, str], timeout_s: float = 300) -> str:
        """A one-off step (migrations, `keys create`): it must exit 0; returns its stdout."""
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        (self.workdir / f"{name}.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, f"{name}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.processes.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.workdir.glob("*.log")))

    def wait(self, check: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
        """Poll ``check`` until it holds; every started process must stay up meanwhile."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self.processes:
                assert proc.poll() is None, f"a process exited ({proc.args})\n{self.logs()}"
            if check():
                return
            time.sleep(0.5)
        raise AssertionError(f"{what} not within {timeout_s}s\n{self.logs()}")

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the worker's warm shutdown
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def command_ok(command: list[str], env: dict[str, str], timeout_s: float) -> bool:
    """An exec probe / healthcheck: exit 0 within its timeout."""
    try:
        return subprocess.run(command, env=env, capture_output=True, timeout=timeout_s).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def run_tiny_job(port: int, key: str, archive: Path, name: str) -> dict:
    """Upload the archive and convert it to GGUF Q8_0 through the API on ``port``; the job as it ended."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        source = upload(client, archive, name)
        created = client.post("/v1/jobs", json={"source": source["id"], "targets": ["gguf:Q8_0"]})
        assert created.status_code == 202, created.text
        job, _ = wait_for_job(client, created.json()["id"], timeout_s=300)
    return job


def pod_env(container: dict[str, Any], docs, secret: dict[str, str], overrides: dict[str, str]) -> dict[str, str]:
    """The container's own environment as the kubelet gives it: ConfigMap values, Secret values
    (the test's), then `overrides` (the hosts, here on loopback)."""
    env = {}
    for name, value in container_env(container, docs).items():
        env[name] = secret[value["secretKeyRef"]["key"]] if isinstance(value, dict) else value
    env.update(overrides)
    return env


def _command(container: dict[str, Any]) -> list[str]:
    command = container["command"]
    assert command == ["quantyard-entrypoint"]  # the images' entrypoint, deploy/entrypoint.sh
    return ["sh", str(ENTRYPOINT), *container["args"]]


class ManifestStack:
    """The rendered prod overlay's containers, run as local processes against the test services."""

    def __init__(self, workdir: Path, postgres_url: str, redis_url: str, s3_server):
        self.docs = render.kustomize(render.K8S / "overlays" / "prod")
        self.workdir = workdir
        self.procs = LocalProcesses(workdir)
        self.port, self.metrics_port = free_port(), free_port()
        self.secret = {"database-url": postgres_url, "broker-url": redis_url, "metrics-token": METRICS_TOKEN,
                       "aws-access-key-id": s3_server.access_key, "aws-secret-access-key": s3_server.secret_key}
        # what the cluster's DNS and the ConfigMap name, here on loopback
        self.overrides = {"QUANTYARD_STORAGE_URL": s3_server.storage_url,
                          "QUANTYARD_S3_ENDPOINT_URL": s3_server.endpoint_url, "QUANTYARD_S3_REGION": "us-east-1",
                          "QUANTYARD_PORT": str(self.port), "QUANTYARD_WORKER_METRICS_PORT": str(self.metrics_port),
                          "QUANTYARD_WORKER_HEARTBEAT_S": "1", "AWS_DEFAULT_REGION": "us-east-1"}

    def spec(self, kind: str, name: str) -> dict[str, Any]:
        (container,) = pod_spec(find(self.docs, kind, name))["containers"]
        return container

    def container(self, kind: str, name: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The container and its environment as a local process: mount paths mapped to folders
        standing in for the volumes, on top of this machine's environment."""
        container = self.spec(kind, name)
        mounts = {}
        for mount in container.get("volumeMounts", []):
            folder = self.workdir / name / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = folder
        env = pod_env(container, self.docs, self.secret, self.overrides)
        return container, clean_env(**{k: map_paths(v, mounts) for k, v in env.items()})

    def run_job(self, kind: str, name: str) -> None:
        container, env = self.container(kind, name)
        self.procs.run(name, _command(container), env)

    def start(self, name: str) -> tuple[dict[str, Any], dict[str, str]]:
        container, env = self.container("Deployment", name)
        self.procs.start(name, _command(container), env)
        return container, env

    def wait(self, check, what: str, timeout_s: float = 120) -> None:
        self.procs.wait(check, what, timeout_s)
