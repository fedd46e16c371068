"""One job, start to finish: claim → fetch → preflight → convert + validate → upload → record.

Every way out of here leaves the job in a final state (or back to a state another delivery can
claim), with its error recorded and no temporary objects left behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quantyard import catalog
from quantyard.archive import extract_archive
from quantyard.engine.errors import Cancelled, ConversionError, InvalidModel
from quantyard.engine.spec import TargetSpec, parse_target
from quantyard.recipes import make_recipe, recipe_hash
from worker.runtime import WorkerRuntime
from worker.watch import JobWatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetWork:
    target_id: str
    spec: TargetSpec


def run_job(rt: WorkerRuntime, job_id: str) -> str:
    """Run a job if this delivery may claim it; returns the claim outcome or the final status."""
    with rt.session() as s:
        outcome = catalog.claim_job(
            s, job_id=job_id, worker_id=rt.worker_id,
            lease_s=rt.settings.job_lease_s, max_attempts=rt.settings.job_max_attempts,
        )
        s.commit()
    if outcome.kind != "claimed":
        log.info("job %s not run: %s", job_id, outcome.kind)
        return outcome.kind
    with JobWatch(rt, job_id, rt.settings.job_lease_s) as watch:
        return _run_claimed(rt, job_id, watch)


def _run_claimed(rt: WorkerRuntime, job_id: str, watch: JobWatch) -> str:
    current_target: str | None = None
    work_dir = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=rt.scratch_dir))
    try:
        job_info = _load_job(rt, job_id)
        watch.progress(0.01, "fetching source", force=True)
        source_dir = _fetch_source(rt, job_info["source"], work_dir)
        targets = job_info["targets"]
        _preflight(rt, job_id, source_dir, targets, watch)
        for index, target in enumerate(targets):
            current_target = target.target_id
            _convert_target(rt, job_id, job_info["source"], source_dir, target, index, len(targets),
                            work_dir, watch)
            current_target = None
        _finish(rt, job_id, "succeeded")
        return "succeeded"
    except Cancelled as exc:
        _finish(rt, job_id, "cancelled", target_id=current_target, code="cancelled", message=str(exc))
        return "cancelled"
    except ConversionError as exc:
        _finish(rt, job_id, "failed", target_id=current_target, code=exc.code, message=str(exc))
        return "failed"
    except BaseException as exc:  # a bug or a time limit: record it, then let Celery see it
        code = "time_limit" if type(exc).__name__ == "SoftTimeLimitExceeded" else "internal_error"
        _finish(rt, job_id, "failed", target_id=current_target, code=code,
                message=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _load_job(rt: WorkerRuntime, job_id: str) -> dict:
    with rt.session() as s:
        job = catalog.get_job(s, job_id=job_id)
        source = catalog.get_source(s, source_id=job.source_id)
        # A redelivered job keeps what an earlier attempt finished and redoes only the rest.
        targets = [
            TargetWork(t.id, parse_target({"format": t.format, "quantization": t.quantization,
                                           "params": t.params or {}}))
            for t in sorted(job.targets, key=lambda t: t.position)
            if not (t.status == "succeeded" and t.artifact_id)
        ]
        return {
            "source": {"id": source.id, "sha256": source.sha256, "key": source.storage_key,
                       "name": source.name},
            "targets": targets,
        }


def _fetch_source(rt: WorkerRuntime, source: dict, work_dir: Path) -> Path:
    archive = work_dir / "source.archive"
    rt.store.download_file(source["key"], archive)
    unpacked = work_dir / "source"
    try:
        extract_archive(archive, unpacked, max_members=rt.settings.max_archive_members,
                        max_unpacked_bytes=rt.settings.max_unpacked_bytes)
    except ValueError as exc:
        raise InvalidModel(f"source {source['id']} could not be unpacked: {exc}") from exc
    finally:
        archive.unlink(missing_ok=True)
    return _model_root(unpacked)


def _model_root(unpacked: Path) -> Path:
    """Archives often wrap the model in one folder; the model root is where config.json is."""
    if (unpacked / "config.json").exists():
        return unpacked
    children = [p for p in unpacked.iterdir() if p.is_dir()]
    if len(children) == 1 and (children[0] / "config.json").exists():
        return children[0]
    raise InvalidModel("the source holds no config.json at its top level (nor in a single folder)")


def _preflight(rt, job_id, source_dir, targets, watch) -> None:
    from quantyard import engine  # heavy imports stay out of the API's path

    report = engine.preflight(source_dir, [t.spec for t in targets])
    with rt.session() as s:
        for t in targets:
            catalog.set_target_status(s, target_id=t.target_id, status="pending",
                                      estimate=report.estimates.get(t.spec.key))
        s.commit()
    watch.progress(0.03, f"preflight ok: {report.architecture}", force=True)


def _convert_target(rt, job_id, source, source_dir, target: TargetWork, index, count,
                    work_dir, watch) -> None:
    from quantyard import engine

    watch.raise_if_cancelled()
    with rt.session() as s:
        catalog.set_target_status(s, target_id=target.target_id, status="running")
        s.commit()
    span_start, span = 0.05 + 0.95 * index / count, 0.95 / count
    recipe = make_recipe(source_sha256=source["sha256"], target=target.spec.to_dict(),
                         engine_version=engine.ENGINE_VERSION)
    digest = recipe_hash(recipe)

    def on_progress(fraction: float, message: str) -> None:
        # Conversion is ~90% of a target's span; the upload takes the rest.
        watch.progress(span_start + span * 0.9 * fraction, f"{target.spec.key}: {message}",
                       target_id=target.target_id, target_fraction=fraction)

    out_dir = work_dir / target.target_id
    out_dir.mkdir()
    result = engine.convert(source_dir, target.spec, out_dir, progress=on_progress,
                            provenance={"source_sha256": source["sha256"], "recipe_hash": digest,
                                        "name": source["name"] or ""})
    watch.progress(span_start + span * 0.92, f"{target.spec.key}: uploading", force=True)
    key = f"artifacts/{job_id}/{target.target_id}/{result.path.name}"
    stored = rt.store.put_file(key, result.path)
    try:
        watch.raise_if_cancelled()
        with rt.session() as s:
            catalog.record_artifact(
                s, job_id=job_id, target_id=target.target_id, source_id=source["id"],
                format=result.format, quantization=result.quantization, sha256=stored.sha256,
                size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
                filename=result.path.name, metrics=result.metrics, metadata=result.metadata,
                engine_version=result.engine_version, recipe=recipe, recipe_hash=digest,
            )
            s.commit()
    except BaseException:
        rt.store.delete(stored.key)  # never leave bytes the catalog does not know about
        raise
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _finish(rt: WorkerRuntime, job_id: str, status: str, *, target_id: str | None = None,
            code: str | None = None, message: str | None = None) -> None:
    with rt.session() as s:
        if target_id is not None:
            catalog.set_target_status(s, target_id=target_id,
                                      status="cancelled" if status == "cancelled" else "failed",
                                      error_code=code, error_message=message)
        catalog.finish_job(s, job_id=job_id, status=status, error_code=code, error_message=message)
        s.commit()
    log.info("job %s %s%s", job_id, status, f" ({code}: {message})" if code else "")
