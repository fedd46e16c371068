"""`quantyard` command line: run the service's processes, and talk to a running service.

Server-side commands import the API or worker lazily so that client commands stay light.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from quantyard.native_env import tune_native_runtimes
from quantyard.settings import get_settings
from quantyard.worker_check import worker_check


def _configure(**overrides) -> None:
    """Apply command-line overrides as QUANTYARD_* variables, so child processes see them too."""
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"QUANTYARD_{name.upper()}"] = str(value)
    get_settings.cache_clear()


@click.group()
@click.version_option(package_name="quantyard")
def main() -> None:
    """Quantyard: convert and quantize models (GGUF, ONNX), with a catalog."""
    tune_native_runtimes()  # before any command imports torch or llama.cpp (native_env.py)


# ---------------------------------------------------------------- server side

@main.command()
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 8600).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the embedded catalog, object store and queue live (~/.quantyard).")
def serve(host, port, data_dir) -> None:
    """API, dashboard and one worker on this machine (embedded default: no servers needed)."""
    _configure(host=host, port=port, data_dir=data_dir.resolve() if data_dir else None)
    settings = get_settings()
    _check_auth_binding(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from quantyard.catalog import upgrade_database

    upgrade_database(settings.resolved_database_url)
    if settings.auth == "required":
        _print_bootstrap_key(settings)
    # uvicorn re-raises SIGTERM after its own shutdown; turning it into SystemExit lets the
    # `finally` below stop the worker instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    worker = subprocess.Popen([sys.executable, "-m", "quantyard.cli", "worker",
                               "--hardware-class", "cpu", "--loglevel", "warning"])
    try:
        click.echo(f"Quantyard catalog {settings.resolved_database_url}")
        click.echo(f"Quantyard objects {settings.resolved_storage_url}")
        click.echo(f"Quantyard broker  {settings.resolved_broker_url}")
        _run_api(settings)
    finally:
        _stop(worker)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_auth_binding(settings) -> None:
    """QUANTYARD_AUTH=disabled makes every caller an admin: only for this machine's own use."""
    if settings.auth != "disabled":
        return
    if not is_loopback(settings.host):
        raise click.ClickException(
            f"QUANTYARD_AUTH=disabled is refused on {settings.host}: without keys anyone who can reach the "
            "port is an admin. Bind to 127.0.0.1 (--host 127.0.0.1) or set QUANTYARD_AUTH=required.")
    click.echo(f"Quantyard authentication DISABLED (QUANTYARD_AUTH=disabled): every caller on "
               f"{settings.host} is an admin of the default organisation")


def _print_bootstrap_key(settings) -> None:
    """First start of a catalog without any key: make an admin key and print it, this once."""
    with _catalog_sessions()() as s:
        from quantyard.catalog import bootstrap_admin_key

        made = bootstrap_admin_key(s)
        s.commit()
    if made is None:
        return
    key, secret = made
    click.echo("Quantyard bootstrap admin key (shown once; keep it, it is not stored):")
    click.echo(f"  QUANTYARD_API_KEY={secret}")
    click.echo(f"  (key {key.id}, organisation default; make more with `quantyard keys create`)")
    sys.stdout.flush()


def _run_api(settings, workers: int = 1) -> None:
    """uvicorn in this process, or ``workers`` processes (each builds its app from the
    environment). Each process anchors the audit chain when it shuts down (api/app.py lifespan)."""
    import uvicorn

    from quantyard.logs import configure_logging, uvicorn_logging

    configure_logging(settings)  # QUANTYARD_LOG_FORMAT=json: JSON lines, uvicorn's too
    click.echo(f"Quantyard listening on http://{settings.host}:{settings.port}", err=False)
    sys.stdout.flush()
    if workers > 1:
        uvicorn.run("api.app:create_served_app", factory=True, workers=workers, host=settings.host, port=settings.port,
                    **uvicorn_logging(settings))
        return
    from api.app import create_app

    uvicorn.run(create_app(settings, freeze_heap=True), host=settings.host, port=settings.port,
                **uvicorn_logging(settings))


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # warm shutdown: finish or requeue the current task
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@main.command()
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="uvicorn worker processes (one per core the API may use).")
def api(host, port, workers) -> None:
    """Run the HTTP API only (production: several replicas behind a load balancer)."""
    _configure(host=host, port=port)
    settings = get_settings()
    _check_auth_binding(settings)
    _run_api(settings, workers)


@main.command()
@click.option("--hardware-class", "hardware_classes", multiple=True, default=["cpu"],
              show_default=True, help="Queue(s) to consume: convert.<class>.")
@click.option("--concurrency", type=int, default=None, help="Parallel jobs (default 1).")
@click.option("--loglevel", default="info", show_default=True)
def worker(hardware_classes, concurrency, loglevel) -> None:
    """Run a conversion worker for one or more hardware classes."""
    from quantyard.engine.manifest import MANIFEST
    from quantyard.logs import set_process_ids
    from quantyard.queue import queue_name
    from worker import hardware
    from worker.celery_app import create_worker_app
    from worker.runtime import worker_identity

    settings = get_settings()
    info = hardware.detect()
    for hardware_class in hardware_classes:
        if hardware_class not in MANIFEST["hardware_classes"]:
            raise click.UsageError(f"unknown hardware class {hardware_class!r}; "
                                   f"valid: {', '.join(MANIFEST['hardware_classes'])}")
        ok, why = hardware.can_serve(info, hardware_class)
        if not ok:
            raise click.ClickException(f"this machine cannot serve {hardware_class!r}: {why}")
    if concurrency:
        _configure(worker_concurrency=concurrency)
        settings = get_settings()
    worker_id = worker_identity("+".join(hardware_classes))
    set_process_ids(worker_id=worker_id)  # on Celery's own lines too (consumer, heartbeat, shutdown)
    app = create_worker_app(settings, hardware_classes=list(hardware_classes), worker_id=worker_id)
    app.worker_main([
        "worker", "-Q", ",".join(queue_name(c) for c in hardware_classes),
        "-c", str(settings.worker_concurrency), "--loglevel", loglevel,
        "-n", f"quantyard-{'-'.join(hardware_classes)}-{os.getpid()}@%h",
        "--without-gossip", "--without-mingle", "-P", "prefork",
    ])


@main.group()
def db() -> None:
    """Catalog database maintenance."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations to QUANTYARD_DATABASE_URL (or the embedded SQLite)."""
    from quantyard.catalog import upgrade_database

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.resolved_database_url)
    click.echo(f"catalog at head: {settings.resolved_database_url.split('@')[-1]}")


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--target", "targets", multiple=True, required=True,
              help="FORMAT:QUANT, e.g. gguf:Q4_K_M (repeat for several).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Folder for the artifacts.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="An importance matrix file (llama.cpp format) for every target.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Text to compute the importance matrix from (default: shipped).")
@click.option("--evaluation", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text each GGUF target's quality report is measured on (default: shipped evaluation set).")
@click.option("--evaluation-chunks", type=click.IntRange(0, 4096), default=None,
              help="Chunks of 512 tokens of the evaluation text to score (0: all; default: "
                   "QUANTYARD_EVALUATION_CHUNKS, else 16).")
@click.option("--no-evaluation", "no_evaluation", is_flag=True,
              help="Skip the quality reports (validation still runs; gates and gguf:auto then fail).")
@click.option("--split-max-size", default=None,
              help="Split quantized outputs into shards of at most this size (e.g. 2G, 500M), "
                   "named like llama.cpp's gguf-split (-00001-of-0000N.gguf).")
@click.option("--name", default=None,
              help="The model's name in the files (GGUF general.name) and their file names "
                   "(default: general.name as llama.cpp's converter derives it, files named after SOURCE).")
@click.option("--source-sha256", default=None,
              help="The sha256 of SOURCE's upload to the service: the files then carry it and their recipe "
                   "hashes, byte for byte as the service makes them (same plan, same engine).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def convert(source, targets, out_dir, imatrix, calibration, evaluation, evaluation_chunks, no_evaluation,
            split_max_size, name, source_sha256, as_json) -> None:
    """Convert SOURCE (a model folder, or one .pt2 / TorchScript / .onnx file) on this machine,
    without the service; same conversion plan, same validation."""
    if source_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", source_sha256):
        raise click.BadParameter("64 lowercase hex digits", param_hint="--source-sha256")
    with tempfile.TemporaryDirectory(prefix="quantyard-program-") as tmp:
        folder = program_folder(source, Path(tmp)) if source.is_file() else source
        _convert(folder, name, name or (source.name.split(".")[0] if source.is_file() else source.name),
                 targets, out_dir, imatrix, calibration, split_max_size, as_json, source_sha256, evaluation,
                 evaluation_chunks, evaluate=not no_evaluation)


def _evaluation_chunks(given: int | None) -> int | None:
    """The quality report's extent: --evaluation-chunks, else the setting; 0 means the whole text."""
    chunks = given if given is not None else get_settings().evaluation_chunks
    return chunks or None


def program_folder(path: Path, tmp: Path) -> Path:
    """One model file as a program source folder: the file, its ONNX external data and an
    inputs.json beside it (if any), linked into `tmp`."""
    from quantyard.engine.onnx.program_files import INPUTS_FILE, MODEL_SUFFIXES

    if not path.name.lower().endswith(MODEL_SUFFIXES):
        raise click.BadParameter(f"{path.name} is not a model file ({', '.join(MODEL_SUFFIXES)}) nor a folder",
                                 param_hint="SOURCE")
    folder = tmp / "source"
    folder.mkdir()
    extras = [path.with_name(path.name + ".data"), path.with_name(path.name + "_data"),
              path.with_suffix(".data"), path.with_name(INPUTS_FILE)]
    for f in [path, *extras]:
        if f.is_file():
            (folder / f.name).symlink_to(f.resolve())
    return folder


def _convert(source, name, stem, targets, out_dir, imatrix, calibration, split_max_size, as_json,
             source_sha256=None, evaluation=None, evaluation_chunks=None, evaluate=True) -> None:
    from quantyard import engine
    from quantyard.engine.stages import convert_many

    try:
        evaluation_text = None
        if evaluation is not None:  # hostile like an upload: size-capped, UTF-8, checked
            from quantyard.engine.evaluation import load_evaluation_text

            evaluation_text = load_evaluation_text(evaluation)
        specs = [engine.parse_target(t) for t in targets]
        report = engine.preflight(source, specs)
    except engine.ConversionError as exc:
        raise click.ClickException(f"{exc.code}: {exc}") from None
    if not as_json:
        click.echo(f"{report.architecture}, {report.parameter_count:,} parameters "
                   f"({report.source_dtype})", err=True)
    with _ProgressBars(disable=as_json) as bars:
        try:
            results = convert_many(
                source, specs, out_dir, progress_for=bars.for_target, report=report,
                source_sha256=source_sha256, evaluation_text=evaluation_text,
                evaluation_chunks=_evaluation_chunks(evaluation_chunks), evaluate=evaluate,
                provenance={"name": name} if name else {}, stem=stem, imatrix=imatrix,
                calibration_text=calibration.read_text() if calibration else None,
                split_max_bytes=_parse_size(split_max_size) if split_max_size else None)
        except engine.ConversionError as exc:
            raise click.ClickException(f"{exc.code}: {exc}") from None
    rows = [{"target": f"{r.format}:{r.quantization}", "path": str(r.path),
             "size_bytes": r.size_bytes,
             "estimated_size_bytes": report.estimates.get(f"{r.format}:{r.quantization}", {})
             .get("size_bytes"), "metrics": r.metrics} for r in results]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        m = {**r["metrics"], **(r["metrics"].get("quality") or {})}  # the evaluation's numbers when measured
        click.echo(f"{r['target']:<14} {r['size_bytes']:>14,d} B  "
                   f"top1={m.get('top1_agreement', float('nan')):.3f}  "
                   f"kl={m.get('mean_kl', float('nan')):.5f}  ppl_ratio={m.get('ppl_ratio', float('nan')):.4f}  "
                   f"{r['path']}")


def _parse_size(text: str) -> int:
    """'2G', '500M', '4096' → bytes (binary units, as gguf-split reads them)."""
    from quantyard.engine.errors import UnsupportedTarget
    from quantyard.engine.spec import parse_size

    try:
        return parse_size(text)
    except UnsupportedTarget as exc:
        raise click.BadParameter(str(exc), param_hint="--split-max-size") from None


class _ProgressBars:
    """One tqdm bar per target, created when that target first reports."""

    def __init__(self, *, disable: bool):
        self.disable, self.bars = disable, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for bar in self.bars.values():
            bar.close()

    def for_target(self, spec):
        from tqdm import tqdm

        def progress(fraction: float, message: str) -> None:
            bar = self.bars.get(spec.key)
            if bar is None:
                bar = self.bars[spec.key] = tqdm(
                    total=1000, desc=spec.key, disable=self.disable, file=sys.stderr,
                    bar_format="{desc:<14} {percentage:3.0f}%|{bar:30}| {elapsed} {postfix}")
            bar.n = round(1000 * fraction)
            bar.set_postfix_str(message[:50])

        return progress


# ---------------------------------------------------------------- client side

server_option = click.option("--server", envvar="QUANTYARD_SERVER", default=None,
                             help="API address (env QUANTYARD_SERVER).")


def _client(server):
    from quantyard.client import QuantyardClient

    settings = get_settings()
    return QuantyardClient(server or settings.server, api_key=settings.api_key)


def _fail(exc) -> None:
    raise click.ClickException(str(exc))


@main.command()
@click.argument("source")
@click.option("--target", "targets", multiple=True, required=True,
              help="FORMAT:QUANT, e.g. gguf:Q8_0 (repeat for several).")
@click.option("--hardware-class", default="cpu", show_default=True)
@click.option("--label", "labels", multiple=True, help="key=value (repeatable).")
@click.option("--name", default=None, help="Source name (default: the folder name).")
@click.option("--base-model", default=None,
              help="The Hugging Face repo the uploaded model comes from (org/name or its huggingface.co URL); "
                   "model cards and ML-BOMs name it as base_model.")
@click.option("--wait", is_flag=True, help="Wait for the job, with a progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the final job as JSON.")
@server_option
def submit(source, targets, hardware_class, labels, name, base_model, wait, as_json, server) -> None:
    """Submit SOURCE (a model folder, an archive, one .pt2 / TorchScript / .onnx file, a source id or
    a storage URI) for conversion."""
    from quantyard.client import ApiError

    if base_model and not Path(source).exists():
        raise click.BadParameter(f"names the repo of an upload, but {source!r} is no local folder or file "
                                 "(a registered source keeps the metadata it was uploaded with)",
                                 param_hint="--base-model")
    client = _client(server)
    try:
        source_ref = _resolve_source(client, source, name, quiet=as_json, base_model=base_model)
        job = client.create_job(source=source_ref, targets=list(targets),
                                hardware_class=hardware_class, labels=_parse_labels(labels))
        if not as_json:
            click.echo(f"job {job['id']} {job['status']}", err=True)
        if wait:
            job = _wait_with_bar(client, job["id"], quiet=as_json)
    except ApiError as exc:
        _fail(exc)
    click.echo(json.dumps(job, indent=2) if as_json else _job_line(job))
    if wait and job["status"] != "succeeded":
        sys.exit(1)


def _parse_labels(labels) -> dict:
    out = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"label {item!r} is not key=value", param_hint="--label")
        out[key] = value
    return out


def _resolve_source(client, source: str, name: str | None, *, quiet: bool, base_model: str | None = None) -> str:
    path = Path(source)
    if not path.exists():
        return source  # a source id or a storage URI: the API resolves it
    from tqdm import tqdm

    from quantyard.archive import pack_directory
    from quantyard.engine.onnx.program_files import MODEL_SUFFIXES

    with tempfile.TemporaryDirectory(prefix="quantyard-upload-") as tmp:
        archive = path
        if path.is_dir() or path.name.lower().endswith(MODEL_SUFFIXES):  # one model file: a folder of it
            archive = Path(tmp) / "source.tar.gz"
            pack_directory(path if path.is_dir() else program_folder(path, Path(tmp)), archive)
        with tqdm(total=archive.stat().st_size, unit="B", unit_scale=True, desc="upload",
                  disable=quiet, file=sys.stderr) as bar:
            uploaded = client.upload_source(archive, name=name or path.name.split(".")[0],
                                            base_model=base_model, on_bytes=bar.update)
    return uploaded["id"]


def _wait_with_bar(client, job_id: str, *, quiet: bool) -> dict:
    from tqdm import tqdm

    with tqdm(total=100, disable=quiet, file=sys.stderr,
              bar_format="{desc:<10} {percentage:3.0f}%|{bar:30}| {postfix}") as bar:
        def update(job: dict) -> None:
            bar.n = round(100 * (job.get("progress") or 0))
            bar.set_description_str(job["status"], refresh=False)
            note = job.get("waiting_reason") if job["status"] == "queued" else None
            bar.set_postfix_str((note or job.get("progress_message") or "")[:60])

        return client.wait(job_id, on_update=update)


def _job_line(job: dict) -> str:
    line = f"{job['id']} {job['status']} progress={job.get('progress', 0):.0%}"
    if job.get("error"):
        line += f" error={job['error']['code']}: {job['error']['message']}"
    if job.get("artifact_ids"):
        line += " artifacts=" + ",".join(job["artifact_ids"])
    return line


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@server_option
def status(job_id, as_json, server) -> None:
    """Show a job."""
    from quantyard.client import ApiError

    try:
        job = _client(server).get_job(job_id)
    except ApiError as exc:
        _fail(exc)
    click.echo(json.dumps(job, indent=2) if as_json else _job_line(job))


_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse_bytes(text: str | None, name: str) -> int | None:
    """'1500', '500M', '2G', '1.5K' -> bytes (binary units; a trailing B is allowed)."""
    if text is None:
        return None
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        value = float(raw[:-1]) * _SIZE_UNITS[raw[-1]] if raw and raw[-1] in _SIZE_UNITS else int(raw)
    except ValueError:
        value = -1
    if not (0 <= value < 1 << 63):  # also refuses nan and inf ("NANK", "INFM")
        raise click.BadParameter(f"{text!r} is not a size like 1500, 500M or 2G", param_hint=name)
    return int(value)


def _artifact_filters(opts: dict) -> dict:
    """The CLI's search options as GET /v1/artifacts query parameters (the server checks the
    values and answers 422 naming the parameter; sizes and labels are checked here first)."""
    labels = opts.pop("labels")
    for item in labels:  # same check as --label of submit, but the server wants "k=v" strings
        _parse_labels([item])
    return {
        **opts, "label": list(labels) or None,
        "min_size": _parse_bytes(opts["min_size"], "--min-size"),
        "max_size": _parse_bytes(opts["max_size"], "--max-size"),
        "include_withdrawn": opts["include_withdrawn"] or None,
        "include_deleted": opts["include_deleted"] or None,
    }


def _artifact_line(a: dict) -> str:
    flags = [f for f, on in (("deleted", a.get("deleted")), ("withdrawn", a.get("withdrawn")),
                             ("legal-hold", a.get("legal_hold"))) if on]
    return (f"{a['id']}  {a['format']}:{a['quantization']:<8} {a['size_bytes']:>14,d}  "
            f"{a['sha256'][:16]}  {a['filename']}" + (f"  [{', '.join(flags)}]" if flags else ""))


@main.command()
@click.option("--format", "fmt", default=None, help="gguf, onnx (any case).")
@click.option("--quantization", default=None, help="e.g. Q4_K_M (any case).")
@click.option("--architecture", default=None, help="The source's, e.g. LlamaForCausalLM.")
@click.option("--source", default=None, help="A source id.")
@click.option("--label", "labels", multiple=True, help="key=value of the job (repeatable: all must match).")
@click.option("--min-size", default=None, help="Bytes, or 500M, 2G, ...")
@click.option("--max-size", default=None, help="Bytes, or 500M, 2G, ...")
@click.option("--created-after", default=None, help="ISO 8601 date or time (inclusive).")
@click.option("--created-before", default=None, help="ISO 8601 date or time (exclusive).")
@click.option("--max-mean-kl", type=float, default=None, help="GGUF: mean KL divergence vs the source.")
@click.option("--min-top1", type=float, default=None, help="GGUF: top-1 agreement with the source (0..1).")
@click.option("--min-cosine", type=float, default=None, help="ONNX: worst cosine vs PyTorch (0..1).")
@click.option("--max-bits-per-weight", type=float, default=None)
@click.option("--q", default=None, help="Free text: file or source name, format, quantization, sha256 prefix.")
@click.option("--sort", type=click.Choice(["created", "size", "mean_kl"]), default="created", show_default=True,
              help="created: newest first; size: smallest first; mean_kl: lowest first (artifacts with a KL).")
@click.option("--include-withdrawn", is_flag=True, help="Also list withdrawn (and flagged) artifacts.")
@click.option("--include-deleted", is_flag=True, help="Also list soft-deleted artifacts (to restore one).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many (default 50; more than one page is fetched as needed).")
@click.option("--all", "fetch_all", is_flag=True, help="Every match, following the cursors.")
@click.option("--cursor", default=None, help="Continue after a previous listing (its next_cursor).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"items": [...], "next_cursor": ...} (next_cursor: null when nothing is left).')
@server_option
def artifacts(as_json, server, limit, fetch_all, **opts) -> None:
    """Search the artifact catalog (filters, sort, cursor paging)."""
    from quantyard.client import ApiError

    if fetch_all and limit is not None:
        raise click.UsageError("--all and --limit exclude each other")
    filters = _artifact_filters(opts)
    filters["format"] = filters.pop("fmt")
    items, shown, next_cursor = [], 0, None
    try:
        for page in _client(server).artifact_pages(limit=None if fetch_all else limit or 50, **filters):
            next_cursor, shown = page.get("next_cursor"), shown + len(page["items"])
            if as_json:
                items += page["items"]
            else:  # print as pages come: --all over a large catalog shows progress
                for a in page["items"]:
                    click.echo(_artifact_line(a))
    except ApiError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps({"items": items, "next_cursor": next_cursor}, indent=2))
    elif next_cursor:
        click.echo(f"{shown} shown; more with --cursor {next_cursor} (or --all)", err=True)


@main.command()
@click.argument("artifact_id")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@server_option
def download(artifact_id, output, server) -> None:
    """Download an artifact's bytes (and its companion files, e.g. ONNX external data, beside
    them); every file's sha256 is checked against the catalog."""
    from tqdm import tqdm

    from quantyard.client import ApiError

    client = _client(server)
    try:
        meta = client.get_artifact(artifact_id)
        if output.is_dir():
            output = output / meta["filename"]
        companions = meta["metadata"].get("companion_files", [])
        files = [(None, output, meta["sha256"])] + [
            (c["name"], output.parent / c["name"], c["sha256"]) for c in companions]
        total = meta["metadata"].get("total_size_bytes", meta["size_bytes"])
        with tqdm(total=total, unit="B", unit_scale=True, desc="download", file=sys.stderr) as bar:
            for name, dest, sha256 in files:
                client.download(artifact_id, dest, expected_sha256=sha256, on_bytes=bar.update, file=name)
    except ApiError as exc:
        _fail(exc)
    for _, dest, _ in files:
        click.echo(str(dest))


def _write_or_print(text: str, output: Path | None) -> None:
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    output.write_text(text, encoding="utf-8")
    click.echo(str(output), err=True)


@main.command()
@click.argument("artifact_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file (default: print).")
@server_option
def card(artifact_id, output, server) -> None:
    """An artifact's model card: Markdown with Hugging Face YAML front matter (base_model,
    quantization, measured metrics, lineage)."""
    from quantyard.client import ApiError

    try:
        text = _client(server).get_card(artifact_id)
    except ApiError as exc:
        _fail(exc)
    _write_or_print(text, output)


@main.command()
@click.argument("artifact_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file (default: print).")
@server_option
def bom(artifact_id, output, server) -> None:
    """An artifact's CycloneDX 1.6 ML-BOM (JSON): hashes, pedigree, model card, formulation."""
    from quantyard.client import ApiError

    try:
        text = _client(server).get_bom(artifact_id)
    except ApiError as exc:
        _fail(exc)
    _write_or_print(text, output)


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def frontier_table(frontier: dict) -> str:
    """GET /v1/sources/{id}/frontier as a table, smallest first; '*' marks the Pareto-optimal."""
    head = (f"{'':1} {'artifact':<30} {'quant':<14} {'size':>14} {'bpw':>6} {'mean_kl':>9} {'ppl_ratio':>9} "
            f"{'top1':>6} {'pp t/s':>8} {'tg t/s':>8}  hardware")
    lines = [head]
    for row in frontier["items"]:
        speed = row.get("speed") or {}
        lines.append(f"{'*' if row['pareto'] else ' ':1} {row['artifact_id']:<30} {row['format'] + ':' + row['name']:<14} "
                     f"{row['size_bytes']:>14,d} {_num(row.get('bits_per_weight'), '.2f'):>6} "
                     f"{_num(row.get('mean_kl'), '.5f'):>9} {_num(row.get('ppl_ratio'), '.4f'):>9} "
                     f"{_num(row.get('top1_agreement'), '.3f'):>6} {_num(speed.get('pp_tokens_per_s'), '.1f'):>8} "
                     f"{_num(speed.get('tg_tokens_per_s'), '.1f'):>8}  {speed.get('hardware_class') or '-'}")
    lines.append(f"* Pareto-optimal in size vs {frontier['loss']} ({len(frontier['items'])} artifacts)")
    return "\n".join(lines)


@main.command()
@click.argument("source_id")
@click.option("--loss", type=click.Choice(["mean_kl", "ppl_ratio"]), default="mean_kl", show_default=True,
              help="The quality measure the Pareto flag ranks by.")
@click.option("--json", "as_json", is_flag=True)
@server_option
def compare(source_id, loss, as_json, server) -> None:
    """Every artifact of SOURCE_ID with size, bits per weight, mean KL, PPL ratio and speed;
    the Pareto-optimal ones (nothing else both smaller and better) marked '*'."""
    from quantyard.client import ApiError

    try:
        frontier = _client(server).frontier(source_id, loss=loss)
    except ApiError as exc:
        _fail(exc)
    click.echo(json.dumps(frontier, indent=2) if as_json else frontier_table(frontier))


def quality_lines(art: dict) -> list[str]:
    """An artifact's quality report and speed, as `quantyard show` prints them."""
    metrics = art.get("metrics") or {}
    q, speed, lines = metrics.get("quality") or {}, metrics.get("speed") or {}, []
    if q:
        lines.append(f"quality     {q.get('n_tokens')} tokens in {q.get('n_chunks')} chunks of {q.get('n_ctx')}: "
                     f"PPL {_num(q.get('ppl'), '.4f')} (source {_num(q.get('ppl_source'), '.4f')}, "
                     f"ratio {_num(q.get('ppl_ratio'), '.4f')})")
        lines.append(f"            mean KL {_num(q.get('mean_kl'), '.6f')} ± {_num(q.get('mean_kl_ci95'), '.6f')}, "
                     f"p99 {_num(q.get('kl_p99'), '.5f')}, max {_num(q.get('kl_max'), '.5f')}; "
                     f"top-1 {_num(q.get('top1_agreement'), '.4f')}; "
                     f"Δp mean {_num(q.get('mean_delta_p'), '.5f')} rms {_num(q.get('rms_delta_p'), '.5f')}")
    elif metrics.get("mean_kl") is not None:
        lines.append(f"validation  mean KL {_num(metrics.get('mean_kl'), '.6f')}, "
                     f"top-1 {_num(metrics.get('top1_agreement'), '.4f')} (probe text)")
    if speed:
        hw = ((art.get("metadata") or {}).get("made_on") or {}).get("hardware_class") or "?"
        lines.append(f"speed       pp{speed.get('n_prompt')} {_num(speed.get('pp_tokens_per_s'), '.1f')} t/s, "
                     f"tg{speed.get('n_gen')} {_num(speed.get('tg_tokens_per_s'), '.1f')} t/s, "
                     f"{speed.get('threads')} threads on {hw}")
    return lines


@main.command()
@click.argument("artifact_id")
@click.option("--json", "as_json", is_flag=True)
@server_option
def show(artifact_id, as_json, server) -> None:
    """An artifact: its file, size, quality report (PPL, KL, top-1) and speed."""
    from quantyard.client import ApiError

    try:
        art = _client(server).get_artifact(artifact_id)
    except ApiError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(art, indent=2))
        return
    click.echo(_artifact_line(art))
    bpw = (art.get("metrics") or {}).get("bits_per_weight")
    click.echo(f"source      {art['source_id']}  job {art.get('job_id') or '-'}"
               + (f"  {bpw:.3f} bits/weight" if isinstance(bpw, int | float) else ""))
    for line in quality_lines(art):
        click.echo(line)


def _call_server(server, as_json: bool, call) -> dict | None:
    """``call(client)``; a refusal prints the server's message and exits 1. With ``as_json`` the
    answer is printed as JSON (None returned), else returned for the command to print."""
    from quantyard.client import ApiError

    try:
        result = call(_client(server))
    except ApiError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return None
    return result


@main.command()
@click.argument("kind", type=click.Choice(["source", "artifact"]))
@click.argument("node_id")
@click.option("--reason", required=True, help="Why (kept with the flag and in the audit trail).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@server_option
def withdraw(kind, node_id, reason, as_json, server) -> None:
    """Withdraw a source or artifact (maintainers): everything made from it is flagged, hidden from
    listings and refused for download."""
    result = _call_server(server, as_json, lambda c: c.withdraw(kind, node_id, reason=reason))
    if result is None:
        return
    node = result["node"]
    state = "was already withdrawn" if result["already_withdrawn"] else "withdrawn"
    click.echo(f"{kind} {node_id} {state}: {node['withdrawal']['reason']}")
    for item in result["flagged"] + result["already_flagged"]:
        what = item.get("name") or f"{item.get('format')}:{item.get('quantization')} {item.get('filename')}"
        click.echo(f"  {'  ' * (item['depth'] - 1)}{item['type']} {item['id']} {what} "
                   f"(root {item['withdrawal']['root']['id']})")


@main.command()
@click.argument("kind", type=click.Choice(["source", "artifact"]))
@click.argument("node_id")
@click.option("--reason", required=True, help="Why the withdrawal is undone (kept in the audit trail).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@server_option
def reinstate(kind, node_id, reason, as_json, server) -> None:
    """Undo the withdrawal of a source or artifact (admins). What was flagged only because of it
    is cleared; what still comes from another withdrawn node stays withdrawn."""
    result = _call_server(server, as_json, lambda c: c.reinstate(kind, node_id, reason=reason))
    if result is None:
        return
    click.echo(f"{kind} {node_id}: withdrawal undone ({reason})")
    for item in result["reinstated"]:
        if (item["type"], item["id"]) != (kind, node_id):
            click.echo(f"  {item['type']} {item['id']} reinstated")
    for item in result["still_withdrawn"]:
        root = item["withdrawal"]["root"]
        click.echo(f"  {item['type']} {item['id']} still withdrawn (via {root['type']} {root['id']})")


@main.command()
@click.argument("artifact_id")
@click.option("--reason", default=None, help="Why (kept with the deletion and in the audit trail).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@server_option
def delete(artifact_id, reason, as_json, server) -> None:
    """Soft-delete an artifact (maintainers): hidden from listings, downloads refused, restorable until
    its bytes are purged; refused while it is under a legal hold."""
    art = _call_server(server, as_json, lambda c: c.delete_artifact(artifact_id, reason=reason))
    if art is None:
        return
    click.echo(f"artifact {artifact_id} deleted; restorable until {art['deletion']['purge_after']} "
               f"(`quantyard restore {artifact_id}`)")
    derived = art.get("derived_artifacts") or []
    if derived:
        click.echo(f"  {len(derived)} artifact(s) made from it stay available: {', '.join(derived)}")


@main.command()
@click.argument("artifact_id")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@server_option
def restore(artifact_id, as_json, server) -> None:
    """Undo the deletion of an artifact (maintainers), as long as its bytes are not purged."""
    if _call_server(server, as_json, lambda c: c.restore_artifact(artifact_id)) is not None:
        click.echo(f"artifact {artifact_id} restored")


@main.command()
@click.argument("artifact_id")
@click.option("--reason", required=True, help="The matter or order behind the hold (kept in the audit trail).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@server_option
def hold(artifact_id, reason, as_json, server) -> None:
    """Place a legal hold on an artifact (maintainers): it cannot be deleted, and a deleted one is
    not purged, until an admin releases the hold."""
    art = _call_server(server, as_json, lambda c: c.set_legal_hold(artifact_id, reason=reason))
    if art is not None:
        held = art["legal_hold"]
        click.echo(f"artifact {artifact_id} on legal hold since {held['at']} by {held['by']}: {held['reason']}")


@main.command()
@click.argument("artifact_id")
@click.option("--reason", default=None, help="Why the hold ends (kept in the audit trail).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@server_option
def release(artifact_id, reason, as_json, server) -> None:
    """Release an artifact's legal hold (admins only: maintainers may place a hold, not lift it)."""
    if _call_server(server, as_json, lambda c: c.release_legal_hold(artifact_id, reason=reason)) is not None:
        click.echo(f"artifact {artifact_id}: legal hold released")


@main.command()
@click.argument("kind", type=click.Choice(["source", "artifact"]))
@click.argument("node_id")
@click.option("--direction", type=click.Choice(["upstream", "downstream", "both"]), default="both")
@click.option("--depth", type=click.IntRange(1, 100), default=None, help="Hops (default: unlimited).")
@server_option
def lineage(kind, node_id, direction, depth, server) -> None:
    """A source's or artifact's lineage graph (JSON), with the recipe of every edge."""
    _call_server(server, True, lambda c: c.lineage(kind, node_id, direction=direction, depth=depth))


# ---------------------------------------------------------------- audit trail (reads the catalog directly)


def _catalog_sessions():
    from quantyard import catalog

    return catalog.make_session_factory(catalog.make_engine(get_settings().resolved_database_url))


def _settings_store():
    from quantyard.storage import open_store

    settings = get_settings()
    return open_store(settings.resolved_storage_url, endpoint_url=settings.s3_endpoint_url,
                      region=settings.s3_region)


def _utc_option(value: str | None, name: str):
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or time", param_hint=name) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


@db.command("grant-app-role")
@click.argument("role", default="quantyard_app")
@click.option("--create", is_flag=True, help="Create the role (LOGIN, no superuser) when it does not exist.")
def db_grant_app_role(role, create) -> None:
    """Give ROLE (the API's and workers' database user) the app's rights on Postgres: read and
    write the catalog, but only SELECT and INSERT on audit_events. Run it after `db upgrade`."""
    from quantyard.catalog import make_engine
    from quantyard.catalog.roles import RoleError, grant_app_role

    try:
        statements = grant_app_role(make_engine(get_settings().resolved_database_url), role, create=create)
    except RoleError as exc:
        raise click.ClickException(str(exc)) from None
    for statement in statements:
        click.echo(statement + ";")


@main.group()
def audit() -> None:
    """The tamper-evident audit trail: verify, anchor, export."""


@audit.command("verify")
@click.option("--anchors", is_flag=True, help="Also check the chain against every anchor in the object store.")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Verify an exported JSON-lines file instead of the catalog.")
@click.option("--app-role", default=None,
              help="The database role the API and workers use (default QUANTYARD_DB_APP_ROLE, else this "
                   "connection's user when it does not own the tables): it must not be able to change audit rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def audit_verify(anchors, path, app_role, as_json) -> None:
    """Recompute the hash chain and report the first broken link; on a catalog, also check that the
    append-only triggers are in place and no role but the owner may change audit rows (exit status
    1 when broken: `triggers_missing` / `grants_unsafe` name what is missing)."""
    from quantyard.catalog.audit import verify_audit_chain, verify_export

    app_role = app_role or get_settings().db_app_role
    if path is not None:
        with path.open("rb") as f:
            result = verify_export(f)
    else:
        with _catalog_sessions()() as s:
            if anchors:
                from quantyard.catalog.anchor import verify_with_anchors

                result = verify_with_anchors(s, _settings_store(), app_role=app_role)
            else:
                result = verify_audit_chain(s, app_role=app_role)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif result.ok:
        anchored = f", {result.anchors_checked} anchor(s) match" if anchors else ""
        click.echo(f"audit chain ok: {result.checked} event(s), head seq {result.head_seq} "
                   f"{(result.head_hash or '')[:16]}{anchored}")
    elif result.problem in ("triggers_missing", "grants_unsafe"):  # the chain itself verified
        click.echo(f"audit trail UNPROTECTED: {result.problem}: {result.reason}; the chain's "
                   f"{result.checked} event(s) verified, head seq {result.head_seq}")
    else:
        where = f"seq {result.first_bad_seq}" + (f" (id {result.first_bad_id})" if result.first_bad_id else "")
        click.echo(f"audit chain BROKEN at {where}: {result.problem}: {result.reason}; "
                   f"{result.checked} event(s) before it verified")
    sys.exit(0 if result.ok else 1)


@audit.command("anchor")
@click.option("--retention-days", type=click.IntRange(min=1), default=None,
              help="Object Lock retention of the anchor (default 7 years), where the bucket has Object Lock.")
@click.option("--mode", type=click.Choice(["COMPLIANCE", "GOVERNANCE"]), default="COMPLIANCE", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def audit_anchor(retention_days, mode, as_json) -> None:
    """Write the chain head (seq, hash, time, count) to the object store under audit-anchors/."""
    from quantyard.catalog.anchor import DEFAULT_RETENTION_DAYS, write_anchor

    with _catalog_sessions()() as s:
        anchor = write_anchor(s, _settings_store(), retention_days=retention_days or DEFAULT_RETENTION_DAYS,
                              mode=mode)
        s.commit()
    if anchor is None:
        click.echo("the audit chain is empty: nothing to anchor", err=True)
        return
    if as_json:
        click.echo(json.dumps(anchor, indent=2))
        return
    retention = anchor["retention"]
    lock = retention if isinstance(retention, str) else f"{retention['mode']} until {retention['retain_until']}"
    click.echo(f"{anchor['key']}  seq {anchor['seq']} {anchor['hash'][:16]}  retention {lock}")


@audit.command("export")
@click.option("--since", default=None, help="ISO 8601 date/time (UTC unless it says otherwise); inclusive.")
@click.option("--until", default=None, help="ISO 8601 date/time; exclusive.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON-lines file to write ('-' for stdout).")
def audit_export(since, until, output) -> None:
    """Export the audit trail for a time range as JSON lines (one event per line, with its hashes)."""
    from quantyard.catalog.audit import iter_export

    since, until = _utc_option(since, "--since"), _utc_option(until, "--until")
    count = 0
    with _catalog_sessions()() as s, click.open_file(str(output), "w", encoding="utf-8", atomic=True) as out:
        for line in iter_export(s, since=since, until=until):
            out.write(line)
            count += 1
    click.echo(f"{count} event(s) exported", err=True)


@main.group()
def retention() -> None:
    """Artifact retention: purge the bytes of deleted artifacts once their grace period is over."""


@retention.command("purge")
@click.option("--now", "ignore_grace", is_flag=True,
              help="Purge every deleted artifact without a legal hold, grace period or not.")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def retention_purge(ignore_grace, limit, as_json) -> None:
    """Remove the bytes of deleted artifacts that are due (held artifacts are never purged); each
    purge is recorded (purged_at) and audited as artifact.purge."""
    from quantyard.catalog.retention import purge_due

    purged = purge_due(_catalog_sessions(), _settings_store(), ignore_grace=ignore_grace, limit=limit,
                       actor="cli:retention")
    if as_json:
        click.echo(json.dumps(purged, indent=2))
        return
    for item in purged:
        click.echo(f"{item['id']}  {len(item['keys'])} object(s)  {item['size_bytes']} bytes")
    click.echo(f"{len(purged)} artifact(s) purged", err=True)


# ---------------------------------------------------------------- API keys (reads the catalog directly)


def _parse_duration(text: str):
    """30d, 12h, 90m, 2w -> timedelta."""
    from datetime import timedelta

    units = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    value, unit = text[:-1], text[-1:].lower()
    try:
        amount = float(value)
    except ValueError:
        amount = -1
    if unit not in units or amount <= 0:
        raise click.BadParameter(f"{text!r}: use a number and m, h, d or w (e.g. 30d)", param_hint="--expires-in")
    return timedelta(**{units[unit]: amount})


@main.group()
def keys() -> None:
    """API keys: make (the secret is printed once), list, revoke. Works on the catalog directly, so
    it can make the first admin key of a new deployment."""


@keys.command("create")
@click.option("--org", "org", default="default", show_default=True,
              help="Organisation name (made when it does not exist).")
@click.option("--role", type=click.Choice(["viewer", "submitter", "maintainer", "admin"]), required=True)
@click.option("--name", required=True, help="The principal: a person or a pipeline (the audit actor).")
@click.option("--expires-in", default=None, help="e.g. 30d, 12h (default: never).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The embedded catalog's folder, as for `serve` (~/.quantyard).")
@click.option("--json", "as_json", is_flag=True)
def keys_create(org, role, name, expires_in, data_dir, as_json) -> None:
    """Make an API key and print its secret (shown this once: only its hash is stored)."""
    from quantyard import catalog
    from quantyard.catalog.models import utcnow

    _configure(data_dir=data_dir.resolve() if data_dir else None)
    expires_at = utcnow() + _parse_duration(expires_in) if expires_in else None
    actor = f"cli:{os.environ.get('USER') or 'unknown'}"
    settings = get_settings()
    if settings.database_url is None:  # embedded: the key may come before the first `serve`
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        catalog.upgrade_database(settings.resolved_database_url)
    try:
        with _catalog_sessions().begin() as s:
            organization = catalog.ensure_organization(s, name=org, actor=actor)
            key, secret = catalog.create_api_key(s, organization_id=organization.id, name=name, role=role,
                                                 expires_at=expires_at, actor=actor)
            data = {**key.to_dict(), "secret": secret}
    except catalog.CatalogError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(secret)
    click.echo(f"key {data['id']}: {name} ({role}) in {org}, "
               f"{'expires ' + data['expires_at'] if data['expires_at'] else 'no expiry'}; "
               "the secret above is not shown again", err=True)


@keys.command("list")
@click.option("--org", "org", default=None, help="Only this organisation's keys.")
@click.option("--json", "as_json", is_flag=True)
def keys_list(org, as_json) -> None:
    """Every key (never a secret): id, prefix, organisation, principal, role, state."""
    from quantyard import catalog
    from quantyard.catalog.models import utcnow

    with _catalog_sessions()() as s:
        org_id = None
        if org is not None:
            found = catalog.get_organization_by_name(s, name=org)
            if found is None:
                raise click.ClickException(f"no organisation called {org!r}")
            org_id = found.id
        items = [k.to_dict() for k in catalog.list_api_keys(s, organization_id=org_id)]
        now = utcnow()
        states = {k.id: ("revoked" if k.revoked_at else "expired" if k.expires_at and k.expires_at <= now
                         else "active") for k in catalog.list_api_keys(s, organization_id=org_id)}
    if as_json:
        click.echo(json.dumps([{**k, "state": states[k["id"]]} for k in items], indent=2))
        return
    for k in items:
        click.echo(f"{k['id']}  {k['key_prefix']}…  {k['organization']:<16} {k['name']:<24} {k['role']:<10} "
                   f"{states[k['id']]:<8} last used {k['last_used_at'] or 'never'}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id) -> None:
    """Revoke KEY_ID: it stops working within QUANTYARD_AUTH_CACHE_S (5 s) on every API process."""
    from quantyard import catalog

    try:
        with _catalog_sessions().begin() as s:
            key = catalog.revoke_api_key(s, key_id=key_id, actor=f"cli:{os.environ.get('USER') or 'unknown'}")
            name = key.name
    except catalog.NotFound:
        raise click.ClickException(f"no API key {key_id}") from None
    click.echo(f"revoked {key_id} ({name})")


main.add_command(worker_check)  # the workers' probe (quantyard/worker_check.py)

if __name__ == "__main__":
    main()
