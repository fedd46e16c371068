"""The manifests are not dead text: the migrate Job's, the API's and the cpu worker's containers of
the rendered prod overlay are started as local processes (their command, args and environment;
the Secret's values and the hosts are the test Postgres, Redis and S3; each mounted volume is a
temporary folder), their probes are run, a job goes through them, and a real Prometheus scrapes
the API and the worker meanwhile and answers the board's core queries."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy import render
from tests.deploy.conftest import start_prometheus
from tests.deploy.k8s_walk import container_env, find, pod_spec
from tests.deploy.local_run import LocalProcesses, command_ok, map_paths, run_tiny_job
from tests.e2e import conftest as e2e
from tests.e2e.conftest import clean_env, free_port

# ~45 s on this VM (process starts, one conversion); in the CI run: issue 12 asks that the
# manifests be shown to run there, not only to render.
pytestmark = [pytest.mark.e2e]

tiny_llama_archive = e2e.tiny_llama_archive  # the e2e tests' fixture, here too

ENTRYPOINT = render.ROOT / "deploy" / "entrypoint.sh"
METRICS_TOKEN = "manifest-test-metrics-token-0123456789"


def _process_env(container: dict[str, Any], docs, secret: dict[str, str], mounts: dict[str, Path],
                 overrides: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet would give it: ConfigMap values, Secret values
    (the test's), mount paths mapped to the folders standing in for the volumes."""
    env = {}
    for name, value in container_env(container, docs).items():
        if isinstance(value, dict):
            value = secret[value["secretKeyRef"]["key"]]
        env[name] = map_paths(value, mounts)
    env.update(overrides)
    return clean_env(**env)


def _command(container: dict[str, Any]) -> list[str]:
    command = container["command"]
    assert command == ["quantyard-entrypoint"]  # the images' entrypoint, deploy/entrypoint.sh
    return ["sh", str(ENTRYPOINT), *container["args"]]


class ManifestStack:
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

    def container(self, kind: str, name: str) -> tuple[dict[str, Any], dict[str, str]]:
        pod = pod_spec(find(self.docs, kind, name))
        (container,) = pod["containers"]
        mounts = {}
        for mount in container.get("volumeMounts", []):
            folder = self.workdir / name / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = folder
        return container, _process_env(container, self.docs, self.secret, mounts, self.overrides)

    def run_job(self, kind: str, name: str) -> None:
        container, env = self.container(kind, name)
        self.procs.run(name, _command(container), env)

    def start(self, name: str) -> tuple[dict[str, Any], dict[str, str]]:
        container, env = self.container("Deployment", name)
        self.procs.start(name, _command(container), env)
        return container, env

    def wait(self, check, what: str, timeout_s: float = 120) -> None:
        self.procs.wait(check, what, timeout_s)


def _probe_ok(probe: dict[str, Any], env: dict[str, str], port: int) -> bool:
    if "exec" in probe:
        return command_ok(probe["exec"]["command"], env, probe["timeoutSeconds"])
    try:
        return httpx.get(f"http://127.0.0.1:{port}{probe['httpGet']['path']}", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_rendered_containers_run_a_job(postgres_url, redis_url, s3_server, tiny_llama_archive, tmp_path):
    stack = ManifestStack(tmp_path, postgres_url, redis_url, s3_server)
    stack.run_job("Job", "quantyard-migrate")
    try:
        api, api_env = stack.start("quantyard-api")
        worker, worker_env = stack.start("quantyard-worker-cpu")
        for container, env in ((api, api_env), (worker, worker_env)):
            for kind in ("livenessProbe", "readinessProbe"):
                stack.wait(lambda c=container, e=env, k=kind: _probe_ok(c[k], e, stack.port), f"{container['name']} {kind}")
        prom = start_prometheus(tmp_path / "prometheus",
                                {"api": [f"127.0.0.1:{stack.port}"], "workers": [f"127.0.0.1:{stack.metrics_port}"]},
                                tokens={"api": METRICS_TOKEN})
        try:
            key = subprocess.run(["quantyard", "keys", "create", "--role", "admin", "--name", "manifest-test"],
                                 env=api_env, check=True, capture_output=True, text=True).stdout.strip()
            job = run_tiny_job(stack.port, key, tiny_llama_archive, "tiny-llama-manifests")
            assert job["status"] == "succeeded", (job, stack.procs.logs())
            core = {
                "queue depth": "max by (hardware_class) (quantyard_queue_depth)",
                "broker list": 'max by (hardware_class) (quantyard_broker_queue_length{hardware_class="cpu"})',
                "finished": 'sum(quantyard_conversions_finished_total{outcome="succeeded", format="gguf"})',
                "stage durations": "histogram_quantile(0.95, sum by (le, stage) (quantyard_stage_duration_seconds_bucket))",
                "live workers": 'max(quantyard_workers_live{hardware_class="cpu"})',
                "bytes written": 'sum(quantyard_conversion_bytes_written_total{format="gguf"}) > 0',
                # the board's API panels: both uvicorn processes' requests (multiprocess mode)
                "api requests": 'sum(quantyard_http_requests_total{route="/v1/jobs", method="POST", status="202"})',
                "api latency": "histogram_quantile(0.95, sum by (le) (quantyard_http_request_duration_seconds_bucket))",
            }
            results: dict[str, list] = {}

            def answered() -> bool:
                results.update({k: prom.query(q)["data"]["result"] for k, q in core.items()})
                return all(results.values())

            stack.wait(answered, f"core queries {[k for k, v in results.items() if not v]}", timeout_s=30)
            assert float(results["finished"][0]["value"][1]) >= 1
            stages = {r["metric"]["stage"] for r in results["stage durations"]}
            assert {"prepare", "fetch", "convert", "upload", "target"} <= stages, stages
        finally:
            prom.stop()
    finally:
        stack.procs.stop()
