"""The images are built and run here, without Docker or a registry: deploy/build_image.py carries
out a Dockerfile on Debian root filesystems (mmdebstrap) standing in for the base images and
makes an OCI image (umoci); runc runs it as Kubernetes' restricted pods would (user 10001,
read-only root, tmpfs scratch, no capabilities, no new privileges), on the host's network so the
container reaches the test Postgres, Redis and S3.

The slow tests (scripts/images.sh) build the API image (~2-3 min: two mmdebstrap runs, cached
under .test-cache/debian-rootfs, then pip install) and run its migrations, its API and its
HEALTHCHECK; and the cpu worker image (~9 min: llama-cpp-python compiles in its build stage;
torch from a loopback mirror of PyTorch's CPU index) and run it with the rendered pod's args and
environment until it has converted a job. The CUDA worker image is not built here: see
docs/deploy.md ("Images built here")."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.images import DEPLOY, stages
from tests.deploy.local_run import ManifestStack, pod_env, run_tiny_job
from tests.e2e import conftest as e2e
from tests.e2e.conftest import free_port
from tests.fixtures.services import service_unavailable

tiny_llama_archive = e2e.tiny_llama_archive  # the e2e tests' fixture, here too

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


def test_build_args_are_the_given_value_else_the_default():
    """--build-arg as docker build's: the given value wins over the ARG's default; the worker
    image's torch index is such an ARG (the test below builds it from a loopback mirror)."""
    builder = _builder()
    assert builder.declared_arg("ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu", {}) == \
        ("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu")
    assert builder.declared_arg("ARG TORCH_INDEX_URL=https://x", {"TORCH_INDEX_URL": "http://127.0.0.1:1/"}) == \
        ("TORCH_INDEX_URL", "http://127.0.0.1:1/")
    assert builder.declared_arg("ARG BASE_IMAGE", {}) == ("BASE_IMAGE", "")
    (run,) = [ln for ln in stages((DEPLOY / "Dockerfile.worker-cpu").read_text())[1] if "torch==" in ln]
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in run and '"torch==2.13.0+cpu"' in run


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

    def __init__(self, image: str, workdir: Path, name: str, args: list[str], env: dict[str, str],
                 scratch: str = "256m"):
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
                                     "options": ["nosuid", "nodev", "mode=0755", "uid=10001", "gid=10001",
                                                 f"size={scratch}"]})
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


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _torch_wheel() -> Path:
    """The torch 2.13.0+cpu wheel this machine keeps (pip's find-links folder), standing in for
    PyTorch's CPU index, which does not resolve from here (docs/deploy.md)."""
    given = os.environ.get("QUANTYARD_TEST_TORCH_WHEEL")
    found = [Path(given)] if given else sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-cp311-*.whl"))
    if not found or not found[0].is_file():
        service_unavailable("a torch 2.13.0+cpu wheel (QUANTYARD_TEST_TORCH_WHEEL, or /opt/wheels)",
                            "no such file")
    return found[0]


class TorchIndex:
    """A PEP 503 simple index on loopback serving the one torch wheel: the build's RUN reaches it
    (it shares the host's network), as it would reach a mirror of PyTorch's index."""

    def __init__(self, root: Path):
        wheel = _torch_wheel()
        project = root / "torch"
        project.mkdir(parents=True)
        (project / wheel.name).symlink_to(wheel)
        href = wheel.name.replace("+", "%2B")
        (project / "index.html").write_text(f'<!DOCTYPE html><html><body><a href="{href}">{wheel.name}</a></body></html>')
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def worker_image(tmp_path_factory) -> str:
    """deploy/Dockerfile.worker-cpu built as it stands (~25 min here: llama-cpp-python compiles
    from source in the build stage), torch from the loopback index via its TORCH_INDEX_URL arg."""
    _require_build_tools()
    work = tmp_path_factory.mktemp("oci-worker")
    index = TorchIndex(work / "index")
    try:
        subprocess.run(["python3", str(DEPLOY / "build_image.py"), str(DEPLOY / "Dockerfile.worker-cpu"),
                        "--layout", str(work / "layout"), "--tag", "worker-cpu",
                        "--build-arg", f"TORCH_INDEX_URL={index.url}"], check=True, timeout=3600)
    finally:
        index.stop()
    return f"{work / 'layout'}:worker-cpu"


@pytest.mark.slow
def test_worker_image_runs_the_pods_worker_and_converts_a_job(worker_image, postgres_url, redis_url, s3_server,
                                                              tiny_llama_archive, tmp_path):
    """The cpu worker image, started with the rendered prod pod's args and environment under the
    pod's restrictions, takes a job the API (a local process) queued and converts it; its
    probe (the image's HEALTHCHECK command) passes inside the container; SIGTERM is a warm
    shutdown (exit 0)."""
    stack = ManifestStack(tmp_path / "stack", postgres_url, redis_url, s3_server)
    stack.workdir.mkdir()
    stack.run_job("Job", "quantyard-migrate")
    spec = stack.spec("Deployment", "quantyard-worker-cpu")
    worker = None
    try:
        _, api_env = stack.start("quantyard-api")
        stack.wait(lambda: _answers(f"http://127.0.0.1:{stack.port}/readyz"), "the API's /readyz")
        env = pod_env(spec, stack.docs, stack.secret, stack.overrides)
        worker = Container(worker_image, tmp_path, "worker", spec["args"], env, scratch="2g")
        probe = spec["livenessProbe"]["exec"]["command"]
        assert probe == _healthcheck(DEPLOY / "Dockerfile.worker-cpu", 0)  # the pod probes what the image does
        deadline = time.monotonic() + 180
        while worker.exec(probe, timeout_s=30).returncode != 0:
            assert worker.proc.poll() is None and time.monotonic() < deadline, worker.output()
            time.sleep(2)
        status = Path(f"/proc/{worker.pid()}/status").read_text()
        assert any(line.split()[1:2] == ["10001"] for line in status.splitlines() if line.startswith("Uid:")), status
        key = subprocess.run(["quantyard", "keys", "create", "--role", "admin", "--name", "image-test"],
                             env=api_env, check=True, capture_output=True, text=True).stdout.strip()
        job = run_tiny_job(stack.port, key, tiny_llama_archive, "tiny-llama-worker-image")
        assert job["status"] == "succeeded", (job, worker.output(), stack.procs.logs())
        rootfs = worker.bundle / "rootfs"
        assert not any((rootfs / "usr" / "bin" / c).exists() for c in ("gcc", "cc", "cmake", "make")), \
            "compilers in the image"
    finally:
        code = worker.stop(timeout_s=120) if worker is not None else None
        stack.procs.stop()
    assert code == 0, f"exit {code} on SIGTERM\n{worker.output()}"  # Celery's warm shutdown
