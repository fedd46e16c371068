"""docker-compose.yml is not dead text: its migrate, api and worker-cpu services (each image's
entrypoint and environment from its Dockerfile, the service's command and environment on top) run
as local processes in their `depends_on` order against the test Postgres, Redis and S3 (the hosts
`postgres`, `redis`, `s3` mapped to them, after checking that each URL matches the service it
names), every healthcheck passes, the README's `docker compose run --rm migrate keys create` makes
the key, and a job goes through. worker-cuda is left out with its `cuda` profile."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy.engine import make_url

from quantyard.settings import Settings
from tests.deploy import compose
from tests.deploy.local_run import LocalProcesses, command_ok, map_paths, run_tiny_job
from tests.e2e import conftest as e2e
from tests.e2e.conftest import clean_env, free_port

# ~40 s on this VM (process starts, one conversion): issue 12 asks that compose be shown to run too.
pytestmark = [pytest.mark.e2e]

tiny_llama_archive = e2e.tiny_llama_archive  # the e2e tests' fixture, here too

RUN = ["migrate", "api", "worker-cpu"]


def _values(s3_server) -> dict[str, str]:
    """The required variables (the secrets). S3's are the test server's: the compose file passes
    them both to the S3 server's identities and to the API and workers."""
    return {"POSTGRES_PASSWORD": "compose-test-postgres", "REDIS_PASSWORD": "compose-test-redis",
            "S3_ACCESS_KEY": s3_server.access_key, "S3_SECRET_KEY": s3_server.secret_key,
            "QUANTYARD_METRICS_TOKEN": "compose-test-metrics-token-0123456789", "GRAFANA_ADMIN_PASSWORD": "unused"}


def _loopback(env: dict[str, str], spec: dict, postgres_url: str, redis_url: str, s3_server) -> dict[str, str]:
    """Each URL naming a compose host is checked against that service's own settings (user,
    database, password, port, bucket), then pointed at the test's server."""
    services = spec["services"]
    db, pg = make_url(env["QUANTYARD_DATABASE_URL"]), services["postgres"]["environment"]
    assert (db.host, db.port, db.username, db.database, db.password) == (
        "postgres", 5432, pg["POSTGRES_USER"], pg["POSTGRES_DB"], pg["POSTGRES_PASSWORD"])
    broker, redis_cmd = urlsplit(env["QUANTYARD_BROKER_URL"]), services["redis"]["command"]
    assert (broker.hostname, broker.port, broker.password) == ("redis", 6379, redis_cmd[redis_cmd.index("--requirepass") + 1])
    s3_args = dict(a.split("=", 1) for a in services["s3"]["command"] if a.startswith("-") and "=" in a)
    endpoint = urlsplit(env["QUANTYARD_S3_ENDPOINT_URL"])
    assert (endpoint.hostname, endpoint.port) == ("s3", int(s3_args["-s3.port"]))
    assert env["QUANTYARD_STORAGE_URL"] == f"s3://{s3_args['-bucket']}"
    (identity,) = json.loads(spec["configs"]["s3-identities"]["content"])["identities"]
    assert identity["credentials"] == [{"accessKey": env["AWS_ACCESS_KEY_ID"], "secretKey": env["AWS_SECRET_ACCESS_KEY"]}]
    return {"QUANTYARD_DATABASE_URL": postgres_url, "QUANTYARD_BROKER_URL": redis_url,
            "QUANTYARD_S3_ENDPOINT_URL": s3_server.endpoint_url, "QUANTYARD_STORAGE_URL": s3_server.storage_url}


class ComposeService:
    """One service as a local process: its volumes and tmpfs are folders, the image's virtual
    environment is this interpreter's, each port the image EXPOSEs is a free local port."""

    def __init__(self, service: compose.Service, workdir: Path):
        self.service = service
        self.mounts = {"/opt/quantyard": Path(sys.prefix)}
        # the volumes and tmpfs, then the image's own folders its ENV names (the migrate service
        # has no tmpfs on the metrics folder: the image's empty one is used)
        image_dirs = [v for v in service.image.env.values() if v.startswith("/") and ":" not in v]
        for i, path in enumerate([*service.mount_paths, *image_dirs]):
            if map_paths(path, self.mounts) == path:
                self.mounts[path] = workdir / service.name / f"fs{i}"
                self.mounts[path].mkdir(parents=True)
        self.ports = {port: free_port() for port in service.image.exposed}

    def env(self, loopback: dict[str, str]) -> dict[str, str]:
        env = {**self.service.image.env, **{k: str(v) for k, v in self.service.spec.get("environment", {}).items()}}
        env = {k: map_paths(v, self.mounts) for k, v in env.items()}
        env.update(loopback)
        if "QUANTYARD_PORT" in env:
            env["QUANTYARD_PORT"] = str(self.ports[int(env["QUANTYARD_PORT"])])
        if Settings().worker_metrics_port in self.ports:  # the worker serves the port its image exposes
            env["QUANTYARD_WORKER_METRICS_PORT"] = str(self.ports[Settings().worker_metrics_port])
        return clean_env(**env, QUANTYARD_WORKER_HEARTBEAT_S="1")

    def command(self, args: list[str] | None = None) -> list[str]:
        """The entrypoint script the image copies in, run from the checkout, with the service's
        command (or ``args``, as `docker compose run SERVICE ARGS` gives)."""
        image = self.service.image
        (entrypoint,) = image.entrypoint
        (script,) = [src for dest, src in image.copied.items() if Path(dest).name == entrypoint]
        return ["sh", str(script), *(self.service.command[1:] if args is None else args)]

    def healthcheck(self) -> tuple[list[str], float]:
        check = self.service.spec["healthcheck"]
        kind, *args = check["test"]
        assert kind == "CMD", check
        for port, local in self.ports.items():
            args = [a.replace(f"127.0.0.1:{port}", f"127.0.0.1:{local}") for a in args]
        return args, compose.duration_s(check["timeout"])


def test_compose_services_run_a_job(postgres_url, redis_url, s3_server, tiny_llama_archive, tmp_path):
    spec = compose.load(_values(s3_server))
    services = compose.services(spec, RUN, {"PATH": os.environ["PATH"]})
    local = {name: ComposeService(service, tmp_path) for name, service in services.items()}
    envs = {}
    procs = LocalProcesses(tmp_path)
    try:
        order = compose.start_order(spec, RUN)
        assert order.index("migrate") < order.index("api") and order.index("migrate") < order.index("worker-cpu")
        for name in order:
            raw_env = {**services[name].image.env, **services[name].spec["environment"]}
            envs[name] = env = local[name].env(_loopback(raw_env, spec, postgres_url, redis_url, s3_server))
            if compose.one_off(spec, name):
                procs.run(name, local[name].command(), env)
                continue
            procs.start(name, local[name].command(), env)
            check, timeout_s = local[name].healthcheck()
            procs.wait(lambda c=check, e=env, t=timeout_s: command_ok(c, e, t), f"{name} healthcheck")
        # the README's next step: docker compose run --rm migrate keys create --role admin --name me
        key = procs.run("keys", local["migrate"].command(["keys", "create", "--role", "admin", "--name", "compose-test"]),
                        envs["migrate"]).strip()
        job = run_tiny_job(int(envs["api"]["QUANTYARD_PORT"]), key, tiny_llama_archive, "tiny-llama-compose")
        assert job["status"] == "succeeded", (job, procs.logs())
        # QUANTYARD_LOG_FORMAT=json: the worker's lines name the job
        lines = (tmp_path / "worker-cpu.log").read_text(errors="replace").splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert any(r.get("job_id") == job["id"] for r in records), procs.logs()
    finally:
        procs.stop()
