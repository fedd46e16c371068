"""The images are built and run here, without Docker or a registry: deploy/build_image.py carries
out a Dockerfile on Debian root filesystems (mmdebstrap) standing in for the base images and
makes an OCI image (umoci); runc runs it as Kubernetes' restricted pods would (user 10001,
read-only root, tmpfs scratch, no capabilities, no new privileges), on the host's network so the
container reaches the test Postgres.

The slow test builds the API image (~6 min the first time: two mmdebstrap runs, cached under
.test-cache/debian-rootfs; then ~2 min of pip install) and runs its migrations, its API and its
HEALTHCHECK. The worker images are not built here: see docs/deploy.md ("Images built here")."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.images import DEPLOY, stages
from tests.e2e.conftest import free_port
from tests.fixtures.services import service_unavailable

DOCKERFILES = sorted(p for p in DEPLOY.glob("Dockerfile.*") if p.suffix != ".dockerignore")


def _builder():
    spec = importlib.util.spec_from_file_location("build_image", DEPLOY / "build_image.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HANDLED = {"FROM", "ENV", "WORKDIR", "RUN", "COPY", "USER", "ENTRYPOINT", "CMD", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK", "ARG"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_builder_reads_every_dockerfile(dockerfile):
    """Cheap: every instruction is one the builder carries out, and it reads the stages as the
    tests do; which bases have a Debian stand-in is stated (the CUDA base has none)."""
    builder = _builder()
    text = dockerfile.read_text()
    assert builder.stages(text) == stages(text)
    preamble, *parts = builder.stages(text)
    assert {line.split()[0].upper() for part in parts for line in part} <= HANDLED
    args = dict(line[4:].split("=", 1) for line in preamble if line.startswith("ARG "))
    bases = {builder.expand(part[0].split()[1], args) for part in parts}
    if dockerfile.name == "Dockerfile.worker-cuda":
        assert not bases <= set(builder.STAND_INS)
    else:
        assert bases <= set(builder.STAND_INS), bases


def _require_build_tools() -> None:
    if os.geteuid() != 0:
        service_unavailable("root (chroot, mount namespaces) for building images", f"euid {os.geteuid()}")
    for tool in ("mmdebstrap", "umoci", "runc", "unshare"):
        if shutil.which(tool) is None:
            service_unavailable(f"`{tool}` (apt-get install mmdebstrap umoci runc)", "not on PATH")


@pytest.fixture(scope="module")
def api_image(tmp_path_factory) -> str:
    _require_build_tools()
    layout = tmp_path_factory.mktemp("oci") / "layout"
    subprocess.run(["python3", str(DEPLOY / "build_image.py"), str(DEPLOY / "Dockerfile.api"), "--layout", str(layout),
                    "--tag", "api"], check=True, timeout=1800)
    return f"{layout}:api"


class Container:
    """One runc container of the image, restricted like the pods (k8s/base)."""

    def __init__(self, image: str, workdir: Path, name: str, args: list[str], env: dict[str, str]):
        self.id = f"quantyard-test-{os.getpid()}-{name}"
        self.bundle = workdir / name
        subprocess.run(["umoci", "unpack", "--image", image, str(self.bundle)], check=True, capture_output=True)
        config_path = self.bundle / "config.json"
        config = json.loads(config_path.read_text())
        process = config["process"]
        process["args"] = [*process["args"][:1], *args]  # the image's entrypoint, the given command
        process["env"] += [f"{k}={v}" for k, v in env.items()]
        process["terminal"] = False
        process["noNewPrivileges"] = True
        process["capabilities"] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
        config["root"]["readonly"] = True
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
        for path in ("/var/lib/quantyard", "/run/quantyard-metrics"):  # the pods' emptyDir volumes
            config["mounts"].append({"destination": path, "type": "tmpfs", "source": "tmpfs",
                                     "options": ["nosuid", "nodev", "mode=0755", "uid=10001", "gid=10001", "size=256m"]})
        config_path.write_text(json.dumps(config))
        self.log = (workdir / f"{name}.log").open("wb")
        self.proc = subprocess.Popen(["runc", "run", "--bundle", str(self.bundle), self.id],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def exec(self, command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        return subprocess.run(["runc", "exec", self.id, *command], capture_output=True, text=True, timeout=timeout_s)

    def pid(self) -> int:
        state = subprocess.run(["runc", "state", self.id], check=True, capture_output=True, text=True).stdout
        return json.loads(state)["pid"]

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            subprocess.run(["runc", "kill", self.id, "TERM"], capture_output=True)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                subprocess.run(["runc", "kill", self.id, "KILL"], capture_output=True)
                self.proc.wait()
        subprocess.run(["runc", "delete", "--force", self.id], capture_output=True)
        self.log.close()
        return self.proc.returncode


def _healthcheck(dockerfile: Path, port: int) -> list[str]:
    (line,) = [ln for ln in stages(dockerfile.read_text())[-1] if ln.startswith("HEALTHCHECK ")]
    command = json.loads(line[line.index("CMD ") + 4:])
    return [a.replace("127.0.0.1:8600", f"127.0.0.1:{port}") for a in command]


@pytest.mark.slow
def test_api_image_builds_migrates_and_serves(api_image, postgres_url, tmp_path):
    env = {"QUANTYARD_DATABASE_URL": postgres_url}
    migrate = Container(api_image, tmp_path, "migrate", ["db", "upgrade"], env)
    assert migrate.proc.wait(timeout=120) == 0, migrate.output()
    migrate.stop()
    rootfs = migrate.bundle / "rootfs"
    assert not any((rootfs / "usr" / "bin" / c).exists() for c in ("gcc", "cc", "cmake", "make")), "compilers in the image"

    port = free_port()
    api = Container(api_image, tmp_path, "api", ["api", "--workers", "2"], {**env, "QUANTYARD_PORT": str(port)})
    try:
        deadline = time.monotonic() + 90
        ready = None
        while time.monotonic() < deadline and ready is None:
            assert api.proc.poll() is None, api.output()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    ready = True
            except httpx.TransportError:
                time.sleep(0.5)
        assert ready, api.output()
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        status = Path(f"/proc/{api.pid()}/status").read_text()
        assert any(line.split()[1:2] == ["10001"] for line in status.splitlines() if line.startswith("Uid:")), status
        check = api.exec(_healthcheck(DEPLOY / "Dockerfile.api", port), timeout_s=10)
        assert check.returncode == 0, check.stdout + check.stderr
        wrote = api.exec(["sh", "-c", "touch /opt/quantyard/x"], timeout_s=10)
        assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr, wrote.stderr
    finally:
        code = api.stop()
    assert code == 0, f"exit {code} on SIGTERM\n{api.output()}"  # uvicorn's graceful shutdown
