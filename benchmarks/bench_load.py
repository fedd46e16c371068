"""Load test: many job submissions from concurrent clients against the production shape.

Starts Postgres (a fresh database on the shared server, or the one given), a Redis db number of its
own, an object store (SeaweedFS's S3 from tests/fixtures/services.py, or a local directory), the API
(`quantyard api`, N uvicorn workers) and conversion workers (`quantyard worker`), then:

1. uploads a tiny Llama and converts it once (the warm-up job), so that every later job with the
   same recipe is answered by reuse (the worker finishes it in its prepare task: claim, recipe
   lookup, HEAD on the store, reuse, settle; no conversion);
2. submits ``--jobs`` distinct jobs (each its own job, labelled with the run and its number) from
   ``--clients`` processes, each with its own keep-alive connection, and times every POST;
3. polls every job (GET /v1/jobs/{id}, timed) until it is final;
4. accounts: the label listing holds exactly the submitted jobs, once each (0 lost, 0 duplicates),
   every one final (succeeded), every target answered once; then stops the stack (SIGTERM: the
   shutdown anchors are written) and runs ``quantyard audit verify --anchors``.

It is a script, not a timed test: run it by hand on a quiet machine (benchmarks/README.md has the
numbers). ``tests/benchmarks/test_bench_load.py`` runs it with 20 jobs and checks the accounting.

    python benchmarks/bench_load.py                          # 1000 jobs, 8 clients, 2 workers
    python benchmarks/bench_load.py --jobs 20 --clients 2 --store local
    python benchmarks/bench_load.py --json-out after.json --compare benchmarks/bench_load_baseline.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from _common import REPO_ROOT, ensure_repo_on_path

ensure_repo_on_path()

import httpx  # noqa: E402

TARGET = "gguf:Q8_0"
FINAL = ("succeeded", "failed", "cancelled")
READY_TIMEOUT_S = 180


# ------------------------------------------------------------------------------------ services


@contextmanager
def postgres_database(admin_url: str | None, keep: bool):
    """A fresh database on the shared server (dropped afterwards unless ``keep``)."""
    from tests.fixtures import services

    if admin_url:
        services.PG_ADMIN_URL = admin_url
    name = services.create_pg_database("quantyard_bench")
    try:
        yield services._pg_url_for(name)
    finally:
        if not keep:
            services.drop_pg_database(name)


@contextmanager
def redis_database(base_url: str, db: int):
    """Redis db number ``db``, which must be empty (another user's queue is never flushed)."""
    import redis

    url = f"{base_url.rstrip('/')}/{db}"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    if client.dbsize():
        raise SystemExit(f"Redis db {db} at {base_url} is not empty: pick a free one with --redis-db")
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@contextmanager
def object_store(kind: str, work: Path):
    """Environment variables for the store: a local directory, or ``weed mini``'s S3."""
    if kind == "local":
        yield {"QUANTYARD_STORAGE_URL": f"file://{work / 'objects'}"}
        return
    from tests.fixtures.services import start_weed_mini, stop_weed

    server = start_weed_mini(work / "weed")
    try:
        yield dict(server.env)
    finally:
        stop_weed(server._proc)


# --------------------------------------------------------------------------------------- stack


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUANTYARD_", "AWS_"))}
    env.update(extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    env: dict[str, str]
    log_dir: Path
    url: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "quantyard.cli", *args], env=self.env, capture_output=True,
                              text=True, cwd=self.env.get("BENCH_CWD"))

    def start(self, name: str, *args: str, nice: int = 0) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        self.processes.append(subprocess.Popen([sys.executable, "-m", "quantyard.cli", *args], env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                               cwd=self.env.get("BENCH_CWD"),
                                               preexec_fn=(lambda: os.nice(nice)) if nice else None))

    def stop(self) -> None:
        """SIGTERM (warm shutdown: the API and workers anchor the audit chain), then wait."""
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def wait_ready(self, client: httpx.Client, workers: int) -> None:
        deadline, last = time.monotonic() + READY_TIMEOUT_S, ""
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"a process exited with {proc.returncode}\n{self.logs()}")
            try:
                ready = client.get("/readyz")
                caps = client.get("/v1/capabilities").json()
                live = next((int(e.get("live_workers", 0)) for e in caps.get("hardware_classes", [])
                             if isinstance(e, dict) and e.get("name") == "cpu"), 0)
                last = f"readyz {ready.status_code}, {live} live cpu worker(s)"
                if ready.status_code == 200 and live >= workers:
                    return
            except (httpx.TransportError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise RuntimeError(f"stack not ready after {READY_TIMEOUT_S}s ({last})\n{self.logs()}")


def tiny_llama_archive(work: Path) -> Path:
    from tests.fixtures.models import cached_model, make_tiny_llama

    folder = cached_model("tiny-llama", make_tiny_llama)
    archive = work / "tiny-llama.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def wait_final(client: httpx.Client, job_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in FINAL:
            return job
        time.sleep(0.3)
    raise RuntimeError(f"job {job_id} not final after {timeout_s}s")


# Run in the stack's environment (its code, its catalog and store): an artifact of the recipe
# a direct gguf:Q8_0 conversion of the source has, so every job of the load is answered by reuse.
SEED_ARTIFACT = """
import hashlib, io, sys
from quantyard import catalog
from quantyard.engine.manifest import ENGINE_VERSION
from quantyard.engine.spec import parse_target
from quantyard.settings import get_settings
from quantyard.storage import open_store
from worker.publish import target_recipe

source_id, target = sys.argv[1], sys.argv[2]
settings = get_settings()
store = open_store(settings.resolved_storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
spec = parse_target(target)
sessions = catalog.make_session_factory(catalog.make_engine(settings.resolved_database_url))
with sessions.begin() as s:
    source = catalog.get_source(s, source_id=source_id)
    recipe, digest = target_recipe(source_sha256=source.sha256, spec=spec, engine_version=ENGINE_VERSION, inputs={})
    body = b"GGUF bench-load seeded artifact " + digest.encode()
    stored = store.put_stream(f"artifacts/bench-load/{digest[:16]}.gguf", io.BytesIO(body))
    art = catalog.record_artifact(s, job_id=None, target_id=None, source_id=source_id, format=spec.format,
                                  quantization=spec.quantization, sha256=stored.sha256, size_bytes=stored.size_bytes,
                                  uri=stored.uri, storage_key=stored.key, filename="seeded.gguf", metrics={},
                                  metadata={"bench_load": "seeded"}, engine_version=ENGINE_VERSION, recipe=recipe,
                                  recipe_hash=digest, actor="bench-load")
    print(art.id)
"""


def warm_up(s: Stack, client: httpx.Client, source_id: str, how: str) -> None:
    """Make the load's recipe reusable: ``convert`` runs one real job; ``seed`` records an
    artifact of that recipe directly (the load measures the service, not the conversion)."""
    if how == "seed":
        seeded = subprocess.run([sys.executable, "-c", SEED_ARTIFACT, source_id, TARGET], env=s.env,
                                capture_output=True, text=True, cwd=s.env.get("BENCH_CWD"))
        if seeded.returncode:
            raise RuntimeError(f"seeding the reusable artifact failed:\n{seeded.stderr[-3000:]}")
        print(f"seeded artifact {seeded.stdout.strip()} for {TARGET}", flush=True)
        return
    warm = client.post("/v1/jobs", json={"source": source_id, "targets": [TARGET]})
    job = wait_final(client, warm.json()["id"], 600)
    if job["status"] != "succeeded":
        raise RuntimeError(f"the warm-up job failed: {job}\n{s.logs()}")
    print(f"warm-up job {job['id']} succeeded", flush=True)


# ------------------------------------------------------------------------------------ the load


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


@dataclass
class Submissions:
    ids: dict[int, str] = field(default_factory=dict)  # job number -> job id
    create_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0  # the load generator's own CPU (all its clients)


def _client_process(url: str, key: str, source_id: str, run: str, counter, jobs: int, gate, out) -> None:
    """One client: its own process and keep-alive connection (http.client: the load generator
    should cost the machine little, and its clients should not share one GIL, which would add
    their waits for it to the latencies measured)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    done, errors = [], []
    gate.wait()
    while True:
        with counter.get_lock():
            n = counter.value
            counter.value += 1
        if n >= jobs:
            break
        body = json.dumps({"source": source_id, "targets": [TARGET], "labels": {"bench": run, "n": str(n)}})
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/jobs", body=body, headers=headers)
            r = conn.getresponse()
            payload = r.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"job {n}: {exc!r}")
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            continue
        ms = (time.perf_counter() - t0) * 1000
        if r.status == 202:
            done.append((n, json.loads(payload)["id"], ms))
        else:
            errors.append(f"job {n}: {r.status} {payload[:200]!r}")
    out.put((done, errors, time.process_time()))


def submit_all(url: str, key: str, *, source_id: str, run: str, jobs: int, clients: int) -> Submissions:
    """``jobs`` POSTs shared out over ``clients`` processes; a refused POST is an error, not retried."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    counter, gate, results = ctx.Value("i", 0), ctx.Barrier(clients + 1), ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(url, key, source_id, run, counter, jobs, gate, results),
                         daemon=True) for _ in range(clients)]
    for proc in procs:
        proc.start()
    gate.wait()
    t0 = time.perf_counter()
    out = Submissions()
    for _ in procs:  # each client reports once, when it has no job left
        done, errors, cpu_s = results.get()
        out.client_cpu_s += cpu_s
        for n, job_id, ms in done:
            out.ids[n] = job_id
            out.create_ms.append(ms)
        out.errors += errors
    out.wall_s = time.perf_counter() - t0
    for proc in procs:
        proc.join()
    return out


def poll_all(url: str, key: str, job_ids: list[str], *, clients: int, timeout_s: float) -> tuple[dict, list[float]]:
    """GET every job until it is final; returns {job id: last seen job} and every GET's latency."""
    last: dict[str, dict] = {}
    get_ms: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + timeout_s

    def client_loop(mine: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
            pending = list(mine)
            while pending and time.monotonic() < deadline:
                still = []
                for job_id in pending:
                    t0 = time.perf_counter()
                    r = c.get(f"/v1/jobs/{job_id}")
                    ms = (time.perf_counter() - t0) * 1000
                    job = r.json() if r.status_code == 200 else {"status": f"http {r.status_code}"}
                    with lock:
                        get_ms.append(ms)
                        last[job_id] = job
                    if job.get("status") not in FINAL:
                        still.append(job_id)
                pending = still
                if pending:
                    time.sleep(0.5)

    shares = [job_ids[i::clients] for i in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(share,), daemon=True) for share in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return last, get_ms


def listed_jobs(client: httpx.Client, run: str) -> list[dict]:
    """Every job with this run's label, through the paged listing."""
    items, cursor = [], None
    while True:
        params = {"label": f"bench={run}", "limit": 500, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        items += page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            return items


def account(subs: Submissions, listed: list[dict], last: dict[str, dict], jobs: int) -> dict:
    """Lost: a number without a 202, or a 202'd id the catalog does not list. Duplicates: one
    number listed twice, or a target answered more than once."""
    listed_ids = [j["id"] for j in listed]
    numbers = [j["labels"].get("n") for j in listed]
    statuses: dict[str, int] = {}
    for j in listed:
        statuses[j["status"]] = statuses.get(j["status"], 0) + 1
    not_listed = set(subs.ids.values()) - set(listed_ids)
    targets_answered = [len([t for t in j.get("targets", []) if t.get("status") == "succeeded"]) for j in listed]
    return {
        "submitted": jobs,
        "accepted": len(subs.ids),
        "listed": len(listed),
        "lost": (jobs - len(subs.ids)) + len(not_listed),
        "duplicates": (len(listed_ids) - len(set(listed_ids))) + (len(numbers) - len(set(numbers)))
        + sum(1 for n in targets_answered if n > 1),
        "unexpected": len(set(listed_ids) - set(subs.ids.values())),
        "statuses": statuses,
        "not_final": sum(1 for j in listed if j["status"] not in FINAL),
        "not_succeeded": sum(1 for j in listed if j["status"] != "succeeded"),
        "reused_targets": sum(1 for j in listed for t in j.get("targets", []) if t.get("reused")),
        "poll_not_final": sum(1 for j in last.values() if j.get("status") not in FINAL),
    }


# ------------------------------------------------------------------------------- CPU accounting


def _tree_cpu(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _backend_cpu(db_url: str) -> float:
    """CPU seconds of the Postgres backends serving the benchmark's database (same machine)."""
    import psutil
    from sqlalchemy.engine import make_url

    from tests.fixtures.services import _pg_admin_connect

    with _pg_admin_connect() as conn:
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                           (make_url(db_url).database,))]
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def cpu_snapshot(s: Stack, db_url: str) -> dict[str, float]:
    """CPU seconds so far: the API processes, the workers, and this database's Postgres backends.
    The machine is shared, so wall-clock rates move with its load; CPU per submission does not."""
    return {"api": _tree_cpu(s.processes[0].pid),
            "workers": sum(_tree_cpu(p.pid) for p in s.processes[1:]),
            "postgres": _backend_cpu(db_url)}


# ------------------------------------------------------------------------------------ profiling


def start_profiler(pid: int, out: str) -> subprocess.Popen:
    """py-spy (PyPI) sampling the API process and its uvicorn workers while they hold the GIL (CPU,
    not waits), as collapsed stacks."""
    Path(out).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--subprocesses", "--rate", "250",
                             "--gil", "--format", "raw", "--output", str(Path(out) / "api.collapsed"), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc: subprocess.Popen, out: str, top: int = 40) -> None:
    """Stop py-spy and print the functions with the most samples on the stack (inclusive)."""
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    inclusive: dict[str, int] = {}
    total = 0
    for line in (Path(out) / "api.collapsed").read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        for frame in set(stack.split(";")):
            name = frame.split(" (")[0] + " " + frame.rsplit("/", 1)[-1].split(":")[0].rstrip(")")
            inclusive[name] = inclusive.get(name, 0) + n
    print(f"\nAPI profile: {total} samples (inclusive share of the functions on the stack)")
    for name, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * n / max(total, 1):5.1f}%  {name}")


# ------------------------------------------------------------------------------------ reporting


ROWS = [
    ("submissions/s", "submissions_per_s", "{:.1f}"),
    ("POST /v1/jobs p50 ms", "create_p50_ms", "{:.1f}"),
    ("POST /v1/jobs p95 ms", "create_p95_ms", "{:.1f}"),
    ("GET /v1/jobs/{id} p50 ms", "get_p50_ms", "{:.1f}"),
    ("GET /v1/jobs/{id} p95 ms", "get_p95_ms", "{:.1f}"),
    ("API CPU ms / submission", "cpu_ms_per_submission_api", "{:.2f}"),
    ("Postgres CPU ms / subm.", "cpu_ms_per_submission_postgres", "{:.2f}"),
    ("workers CPU ms / subm.", "cpu_ms_per_submission_workers", "{:.2f}"),
    ("clients CPU ms / subm.", "cpu_ms_per_submission_clients", "{:.2f}"),
    ("load average (1 min)", "load_avg_1m", "{:.1f}"),
    ("all final after (s)", "drain_s", "{:.1f}"),
    ("lost", "lost", "{}"),
    ("duplicates", "duplicates", "{}"),
    ("audit verify --anchors", "audit", "{}"),
    ("audit events chained", "audit_events", "{}"),
]


def fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def print_table(result: dict, baseline: dict | None) -> None:
    print(f"\n{result['jobs']} jobs, {result['clients']} clients, API {result['api_workers']} uvicorn worker(s), "
          f"{result['workers']} worker(s), store {result['store']}, commit {result['commit']}")
    if baseline:
        print(f"baseline: commit {baseline.get('commit')} ({baseline.get('api_workers')} uvicorn worker(s))")
        print(f"| {'':<26} | {'before':>10} | {'after':>10} |\n|{'-' * 28}|{'-' * 12}|{'-' * 12}|")
        for label, key, pattern in ROWS:
            print(f"| {label:<26} | {fmt(baseline.get(key), pattern):>10} | {fmt(result.get(key), pattern):>10} |")
    else:
        print(f"| {'':<26} | {'value':>10} |\n|{'-' * 28}|{'-' * 12}|")
        for label, key, pattern in ROWS:
            print(f"| {label:<26} | {fmt(result.get(key), pattern):>10} |")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------ main


def run(args) -> dict:
    run_id = uuid.uuid4().hex[:10]
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="quantyard-bench-load-", dir=args.work_dir))
        db_url = stack.enter_context(postgres_database(args.pg_admin_url, args.keep))
        broker = stack.enter_context(redis_database(args.redis_url, args.redis_db))
        store_env = stack.enter_context(object_store(args.store, work))
        port = free_port()
        env = clean_env(QUANTYARD_DATABASE_URL=db_url, QUANTYARD_BROKER_URL=broker, QUANTYARD_DATA_DIR=str(work),
                        QUANTYARD_PORT=str(port), QUANTYARD_WORKER_HEARTBEAT_S="1",
                        QUANTYARD_AUDIT_CHAIN=args.audit_chain, **store_env)
        if args.code_dir:  # run another checkout's code (the baseline) with this script
            env["PYTHONPATH"] = str(Path(args.code_dir).resolve())
            env["BENCH_CWD"] = str(Path(args.code_dir).resolve())
        s = Stack(env=env, log_dir=work, url=f"http://127.0.0.1:{port}")
        upgraded = s.cli("db", "upgrade")
        if upgraded.returncode:
            raise RuntimeError(upgraded.stderr)
        made = s.cli("keys", "create", "--role", "admin", "--name", "bench-load")
        if made.returncode:
            raise RuntimeError(made.stderr)
        key = made.stdout.strip()
        api_args = ["api"] + (["--workers", str(args.api_workers)] if args.api_workers != 1 else [])
        s.start("api", *api_args)
        for i in range(args.workers):
            s.start(f"worker{i}", "worker", "--hardware-class", "cpu", "--loglevel", "warning", nice=args.worker_nice)
        stack.callback(s.stop)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=s.url, timeout=120, headers=headers) as c:
            s.wait_ready(c, args.workers)
            archive = tiny_llama_archive(work)
            up = c.post("/v1/sources", params={"name": "bench-tiny-llama"}, content=archive.read_bytes(),
                        headers={"Content-Type": "application/gzip"})
            if up.status_code != 201:
                raise RuntimeError(f"upload: {up.status_code} {up.text}")
            source_id = up.json()["id"]
            warm_up(s, c, source_id, args.warmup)
            print(f"submitting {args.jobs} jobs from {args.clients} clients", flush=True)
            profiler = start_profiler(s.processes[0].pid, args.profile) if args.profile else None
            cpu0 = cpu_snapshot(s, db_url)
            subs = submit_all(s.url, key, source_id=source_id, run=run_id, jobs=args.jobs, clients=args.clients)
            cpu1 = cpu_snapshot(s, db_url)
            load = os.getloadavg()[0]
            if profiler is not None:
                stop_profiler(profiler, args.profile)
            t_submitted = time.perf_counter()
            last, get_ms = poll_all(s.url, key, list(subs.ids.values()), clients=args.clients,
                                    timeout_s=args.drain_timeout)
            drain_s = time.perf_counter() - t_submitted
            listed = listed_jobs(c, run_id)
        s.stop()  # before the audit check: the shutdown anchors cover every event
        verified = s.cli("audit", "verify", "--anchors", "--json")
        try:
            audit = json.loads(verified.stdout)
        except ValueError:
            audit = {"ok": False, "reason": (verified.stdout + verified.stderr)[-500:]}
        counts = account(subs, listed, last, args.jobs)
        result = {
            "commit": git_commit() if not args.code_dir else args.code_label or str(args.code_dir),
            "jobs": args.jobs, "clients": args.clients, "api_workers": args.api_workers, "workers": args.workers,
            "worker_nice": args.worker_nice,
            "audit_chain": args.audit_chain if not args.code_dir else None,
            "store": args.store, "cpus": os.cpu_count(),
            "submit_wall_s": round(subs.wall_s, 3),
            "submissions_per_s": round(len(subs.ids) / subs.wall_s, 1) if subs.wall_s else None,
            "create_p50_ms": percentile(subs.create_ms, 50), "create_p95_ms": percentile(subs.create_ms, 95),
            "get_p50_ms": percentile(get_ms, 50), "get_p95_ms": percentile(get_ms, 95),
            "create_mean_ms": statistics.fmean(subs.create_ms) if subs.create_ms else None,
            "gets": len(get_ms), "drain_s": round(drain_s, 1), "errors": subs.errors[:20],
            "load_avg_1m": round(load, 1),
            **{f"cpu_ms_per_submission_{k}": round(1000 * (cpu1[k] - cpu0[k]) / max(len(subs.ids), 1), 2)
               for k in cpu0},
            "cpu_ms_per_submission_clients": round(1000 * subs.client_cpu_s / max(len(subs.ids), 1), 2),
            **counts,
            "audit": "ok" if audit.get("ok") else f"BROKEN: {audit.get('problem')}: {audit.get('reason')}",
            "audit_events": audit.get("checked"), "anchors_checked": audit.get("anchors_checked"),
            "audit_pending": audit.get("pending"),
        }
        for k in ("create_p50_ms", "create_p95_ms", "get_p50_ms", "get_p95_ms", "create_mean_ms"):
            result[k] = round(result[k], 2) if result[k] is not None else None
        if args.keep:
            print(f"kept {work} and its database")
        else:
            import shutil

            stack.callback(shutil.rmtree, work, ignore_errors=True)
        return result


def main(argv: list[str] | None = None) -> int:
    from tests.fixtures.services import PG_ADMIN_URL, REDIS_BASE_URL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes of `quantyard api`")
    p.add_argument("--workers", type=int, default=2, help="`quantyard worker` processes")
    p.add_argument("--worker-nice", type=int, default=0,
                   help="run the conversion workers at this nice level (on one small machine they otherwise "
                        "take CPU from the API while it is measured; in production they run on other nodes)")
    p.add_argument("--audit-chain", choices=("direct", "deferred"), default="deferred",
                   help="QUANTYARD_AUDIT_CHAIN of the stack (older code ignores it)")
    p.add_argument("--store", choices=("s3", "local"), default="s3")
    p.add_argument("--warmup", choices=("seed", "convert"), default="seed",
                   help="seed: record the reusable artifact directly; convert: one real conversion first")
    p.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    p.add_argument("--redis-url", default=REDIS_BASE_URL)
    p.add_argument("--redis-db", type=int, default=11, help="must be empty; flushed at the end")
    p.add_argument("--drain-timeout", type=float, default=900)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the work folder and the database")
    p.add_argument("--code-dir", default=None, help="run the stack from this checkout (e.g. the baseline)")
    p.add_argument("--code-label", default=None, help="what to call --code-dir in the results")
    p.add_argument("--json-out", default=None)
    p.add_argument("--profile", default=None, help="py-spy the API during the submissions into this folder")
    p.add_argument("--compare", default=None, help="a previous --json-out to print side by side")
    args = p.parse_args(argv)
    result = run(args)
    baseline = json.loads(Path(args.compare).read_text()) if args.compare else None
    print_table(result, baseline)
    if result["errors"]:
        print("errors:", *result["errors"], sep="\n  ")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    ok = (result["lost"] == 0 and result["duplicates"] == 0 and result["not_final"] == 0
          and result["unexpected"] == 0 and result["audit"] == "ok")
    print("accounting:", "ok" if ok else "FAILED", json.dumps({k: result[k] for k in (
        "submitted", "accepted", "listed", "lost", "duplicates", "unexpected", "not_final", "statuses")}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
