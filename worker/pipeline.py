"""A job's shared work, done once: claim → fetch → preflight → lossless intermediate → hand each
remaining target to a task of its own (see target_pipeline.py).

Every way out of here leaves the job in a final state, or dispatched to its targets, or back to a
state another delivery can claim; errors are recorded and no temporary objects are left behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from quantyard import catalog
from quantyard.engine.errors import Cancelled, ConversionError
from quantyard.engine.spec import parse_target
from worker.limits import ScratchQuota, memory_limit, resource_limit_of, scratch_limit
from worker.outage import CatalogUnavailable, catalog_calls, is_catalog_outage
from worker.publish import publish, target_recipe
from worker.reuse import find_present, imatrix_spec, reuse, reuse_known_targets
from worker.runtime import WorkerRuntime
from worker.sources import fetch_artifact, fetch_gguf_source, fetch_source, source_info
from worker.watch import JobWatch, LeaseLost

log = logging.getLogger(__name__)

# dispatch(job_id, target_id, inputs) sends one target to its own task.
Dispatch = Callable[[str, str, dict], None]


def run_job(rt: WorkerRuntime, job_id: str, dispatch: Dispatch) -> str:
    """Do a job's shared work if this delivery may claim it; returns the claim outcome, or
    "dispatched" once the targets are on their way, or the job's final status, or "lease_lost"
    (another worker took the job over after this one's lease expired). Raises
    ``CatalogUnavailable`` when the catalog cannot be reached for the claim: the message must
    be kept for later, not dropped."""
    with catalog_calls(), rt.session() as s:
        outcome = catalog.claim_job(
            s, job_id=job_id, worker_id=rt.worker_id,
            lease_s=rt.settings.job_lease_s, max_attempts=rt.settings.job_max_attempts,
        )
        s.commit()
    if outcome.kind != "claimed":
        log.info("job %s not prepared here: %s", job_id, outcome.kind)
        return outcome.kind
    with JobWatch(rt, job_id, rt.settings.job_lease_s) as watch:
        return _prepare(rt, job_id, watch, dispatch)


def _prepare(rt: WorkerRuntime, job_id: str, watch: JobWatch, dispatch: Dispatch) -> str:
    work_dir = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=rt.scratch_dir))
    watch.scratch = ScratchQuota(work_dir, scratch_limit(rt.settings))
    try:
        job = _load_job(rt, job_id)
        if reuse_known_targets(rt, job):  # before any fetch: a fully reused job ends here
            job = _load_job(rt, job_id)
            if all(status == "succeeded" for _, _, status in job["targets"]):
                return _dispatch_nothing(rt, job_id, f"all {len(job['targets'])} target(s) reused")
        watch.progress(0.05, "fetching source", force=True)
        if job["source"]["format"] == "gguf":
            pending, inputs = _prepare_gguf_source(rt, job, work_dir, watch)
        else:
            source_dir = fetch_source(rt, job["source"], work_dir)
            report = _preflight(rt, job, source_dir, watch)
            pending, inputs = _shared_work(rt, job, source_dir, report, work_dir, watch)
        finished = _dispatch_nothing(rt, job_id, f"{len(pending)} target(s) dispatched", inputs)
        for target_id in pending:
            _send(dispatch, job_id, target_id, inputs)
        return finished
    except LeaseLost as exc:
        log.warning("job %s: %s; leaving it to that worker", job_id, exc)
        return "lease_lost"
    except Cancelled as exc:
        _fail(rt, job_id, "cancelled", "cancelled", str(exc))
        return "cancelled"
    except ConversionError as exc:
        exc = resource_limit_of(exc, rt.settings) or exc  # e.g. an allocation failure, wrapped
        _fail(rt, job_id, "failed", exc.code, str(exc))
        return "failed"
    except BaseException as exc:  # a bug or a time limit: record it, then let Celery see it
        if (limit := resource_limit_of(exc, rt.settings)) is not None:  # memory, time
            _fail(rt, job_id, "failed", limit.code, str(limit))
            return "failed"
        if is_catalog_outage(exc):  # nothing can be recorded: the lease lapses, the job is redone
            raise CatalogUnavailable(f"the catalog became unreachable: {type(exc).__name__}") from exc
        code = "time_limit" if type(exc).__name__ == "SoftTimeLimitExceeded" else "internal_error"
        _fail(rt, job_id, "failed", code, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _send(dispatch: Dispatch, job_id: str, target_id: str, inputs: dict) -> None:
    """One target's message. The job is already dispatched (its targets and their inputs are in
    the catalog), so a broker that refuses (e.g. Redis restarting) must not fail the job: the
    target stays pending and the reconciler re-sends it after its grace period."""
    try:
        dispatch(job_id, target_id, inputs)
    except Exception as exc:  # kombu/redis raise many types; none is the job's fault
        log.warning("job %s: target %s not sent (%s); the reconciler will re-send it",
                    job_id, target_id, type(exc).__name__)


def _dispatch_nothing(rt, job_id: str, message: str, inputs: dict | None = None) -> str:
    """End the prepare stage; the job settles here when no target is left to run."""
    with rt.session() as s:
        catalog.mark_dispatched(s, job_id=job_id, message=message, inputs=inputs)
        finished = catalog.settle_job(s, job_id=job_id)
        s.commit()
        return finished.status if finished is not None else "dispatched"


def _load_job(rt: WorkerRuntime, job_id: str) -> dict:
    with rt.session() as s:
        job = catalog.get_job(s, job_id=job_id)
        source = catalog.get_source(s, source_id=job.source_id)
        return {
            "id": job.id,
            "organization_id": getattr(job, "organization_id", None),
            "source": source_info(source),
            # (target id, spec, status) in the order they were asked for
            "targets": [(t.id, parse_target(t.to_spec_dict()), t.status)
                        for t in sorted(job.targets, key=lambda t: t.position)],
        }


def _shared_work(rt, job: dict, source_dir: Path, report, work_dir: Path,
                 watch: JobWatch) -> tuple[list[str], dict]:
    """GGUF targets share a lossless intermediate (and imatrices); ONNX targets share one fp32
    export (_onnx_fp32). Returns the target ids still to make and the inputs for their tasks."""
    pending = [t for t, _, status in job["targets"] if status != "succeeded"]
    inputs: dict = {}
    if any(spec.format == "gguf" for _, spec, _ in job["targets"]):
        intermediate = _intermediate(rt, job, source_dir, report, work_dir, watch)
        pending = _reuse_for_targets(rt, job, intermediate)
        inputs["intermediate_artifact_id"] = intermediate["id"]
        inputs["imatrix_artifact_ids"] = _imatrices(rt, job, pending, source_dir, intermediate,
                                                    work_dir, watch)
    export, users = _onnx_fp32_users(job, pending, source_dir)
    if len(users) >= 2:  # one target alone gains nothing from a separate export
        start = 0.9 if inputs else 0.1  # after the GGUF work, when the job has both
        fp32 = _onnx_fp32(rt, job, export, source_dir, work_dir, watch, start)
        given = {t for t, quantized in users.items() if not quantized and _give(rt, job, t, fp32)}
        pending = [t for t in pending if t not in given]
        # per target: the others (another opset, an fp32 with params of its own) convert alone
        inputs["onnx_fp32_artifact_ids"] = {t: fp32["id"] for t, quantized in users.items() if quantized}
    return pending, inputs


def _onnx_fp32_users(job: dict, pending: list[str], source_dir: Path) -> tuple[object, dict[str, bool]]:
    """The onnx:fp32 export spec to share and the pending ONNX targets it serves, {target id:
    quantized?}: those whose export spec (opset) equals the first ONNX target's; an fp32 target only when that export is
    all it asks for (other params, e.g. external_data, make it convert on its own). Empty for a
    program source: it converts whole, per target."""
    from quantyard import engine

    specs = {t: (spec, engine.onnx_fp32_spec(source_dir, spec))
             for t, spec, _ in job["targets"] if t in pending and spec.format == "onnx"}
    shared = next((export for _, export in specs.values() if export is not None), None)
    users = {}
    for target_id, (spec, export) in specs.items():
        if export is None or export != shared:
            continue
        if spec.quantization != "fp32":
            users[target_id] = True
        elif set(spec.params) <= {"opset"}:
            users[target_id] = False
    return shared, users


def _onnx_fp32(rt, job: dict, spec, source_dir: Path, work_dir: Path, watch: JobWatch,
               start: float) -> dict:
    """The fp32 ONNX export the job's ONNX targets are quantized from, made once and published
    as an artifact (recipe: source + onnx:fp32 spec + engine), or an earlier job's, reused."""
    from quantyard import engine

    recipe, digest = target_recipe(source_sha256=job["source"]["sha256"], spec=spec,
                                   engine_version=engine.ENGINE_VERSION, inputs={})
    existing = find_present(rt, digest, job.get("organization_id"))
    if existing is not None:
        watch.progress(0.98, f"reusing onnx fp32 export {existing['id']}", force=True)
        return existing

    def on_progress(fraction: float, message: str) -> None:
        watch.progress(start + (0.98 - start) * fraction, f"onnx fp32 export: {message}")

    result = engine.convert(source_dir, spec, work_dir / "onnx-fp32", progress=on_progress,
                            provenance={"source_sha256": job["source"]["sha256"],
                                        "recipe_hash": digest, "name": job["source"]["name"] or ""})
    watch.progress(0.98, "onnx fp32 export: uploading", force=True)
    return publish(rt, job_id=job["id"], target_id=None, source_id=job["source"]["id"],
                   result=result, key=f"artifacts/{job['id']}/onnx-fp32/{result.path.name}",
                   recipe=recipe, digest=digest, before_record=watch.raise_if_cancelled)


def _prepare_gguf_source(rt, job: dict, work_dir: Path, watch: JobWatch) -> tuple[list, dict]:
    """A GGUF source is its own intermediate: check it, warn when it is already quantized."""
    from quantyard.engine.stages import preflight_gguf

    path = fetch_gguf_source(rt, job["source"], work_dir)
    report = preflight_gguf(path, [spec for _, spec, _ in job["targets"]],
                            memory_limit_bytes=memory_limit(rt.settings))
    _record_estimates(rt, job, report)
    if report.source_dtype not in ("F32", "F16", "BF16"):
        with rt.session() as s:
            catalog.add_job_warning(
                s, job_id=job["id"], code="requantized",
                message=f"the source GGUF is already quantized ({report.source_dtype}); "
                        "requantizing it compounds the loss — quantize from the original "
                        "F32/F16/BF16 weights when you have them")
            s.commit()
    watch.progress(0.9, f"preflight ok: GGUF {report.architecture} {report.source_dtype}",
                   force=True)
    pending = [t for t, _, status in job["targets"] if status != "succeeded"]
    return pending, {"source_gguf": True}


def _record_estimates(rt, job: dict, report) -> None:
    with rt.session() as s:
        for target_id, spec, status in job["targets"]:
            catalog.set_target_status(s, target_id=target_id, status=status,
                                      estimate=report.estimates.get(spec.key))
        s.commit()


def _preflight(rt, job: dict, source_dir: Path, watch: JobWatch):
    from quantyard import engine  # heavy imports stay out of the API's path

    report = engine.preflight(source_dir, [spec for _, spec, _ in job["targets"]],
                              memory_limit_bytes=memory_limit(rt.settings))
    _record_estimates(rt, job, report)
    watch.progress(0.1, f"preflight ok: {report.architecture}", force=True)
    return report


def _intermediate(rt, job: dict, source_dir: Path, report, work_dir: Path,
                  watch: JobWatch) -> dict:
    """The lossless GGUF every target is made from: reused when any job made it before."""
    from quantyard import engine
    from quantyard.engine.stages import intermediate_target, make_intermediate

    spec = intermediate_target(report)
    recipe, digest = target_recipe(source_sha256=job["source"]["sha256"], spec=spec,
                                   engine_version=engine.ENGINE_VERSION, inputs={})
    existing = find_present(rt, digest, job.get("organization_id"))
    if existing is not None:
        watch.progress(0.9, f"reusing intermediate {existing['id']}", force=True)
        return existing

    def on_progress(fraction: float, message: str) -> None:
        watch.progress(0.1 + 0.75 * fraction, f"intermediate {spec.key}: {message}")

    out_dir = work_dir / "intermediate"
    result = make_intermediate(source_dir, report, out_dir, progress=on_progress,
                               provenance={"source_sha256": job["source"]["sha256"],
                                           "recipe_hash": digest,
                                           "name": job["source"]["name"] or ""})
    watch.progress(0.9, f"intermediate {spec.key}: uploading", force=True)
    return publish(rt, job_id=job["id"], target_id=None, source_id=job["source"]["id"],
                   result=result, key=f"artifacts/{job['id']}/intermediate/{result.path.name}",
                   recipe=recipe, digest=digest, before_record=watch.raise_if_cancelled)


def _imatrices(rt, job: dict, pending: list[str], source_dir: Path, intermediate: dict,
               work_dir: Path, watch: JobWatch) -> dict[str, str]:
    """One importance matrix per distinct calibration text among the targets that want one
    (imatrix types, or params {"imatrix": true}); returns {target id: imatrix artifact id}."""
    from quantyard.engine.stages import wants_imatrix

    wanted = {tid: spec for tid, spec, _ in job["targets"]
              if tid in pending and wants_imatrix(spec)}
    by_text: dict[str | None, str] = {}
    out: dict[str, str] = {}
    for target_id, spec in wanted.items():
        text = spec.params.get("calibration_text")
        if text not in by_text:
            by_text[text] = _imatrix(rt, job, source_dir, intermediate, text, work_dir, watch)["id"]
        out[target_id] = by_text[text]
    return out


def _imatrix(rt, job: dict, source_dir: Path, intermediate: dict, text: str | None,
             work_dir: Path, watch: JobWatch) -> dict:
    """An imatrix artifact (format "imatrix"), reused when the same source and text made one."""
    from quantyard import engine
    from quantyard.engine.results import ConversionResult
    from quantyard.engine.stages import compute_imatrix

    spec = imatrix_spec(text)
    calibration = spec.params["calibration"]
    recipe, digest = target_recipe(source_sha256=job["source"]["sha256"], spec=spec,
                                   engine_version=engine.ENGINE_VERSION, inputs={})
    existing = find_present(rt, digest, job.get("organization_id"))
    if existing is not None:
        return existing
    local = work_dir / intermediate["filename"]
    if not local.exists():
        fetch_artifact(rt, intermediate, work_dir)
    path = work_dir / f"{job['source']['name'] or 'model'}-imatrix.gguf"

    def on_progress(fraction: float, message: str) -> None:
        watch.progress(0.9 + 0.1 * fraction, message)

    info = compute_imatrix(source_dir, local, path, text=text, progress=on_progress)
    result = ConversionResult(path=path, format="imatrix", quantization="imatrix",
                              size_bytes=path.stat().st_size, metadata={"imatrix": info},
                              metrics={}, engine_version=engine.ENGINE_VERSION)
    return publish(rt, job_id=job["id"], target_id=None, source_id=job["source"]["id"],
                   result=result, key=f"artifacts/{job['id']}/imatrix/{calibration[:16]}/{path.name}",
                   recipe=recipe, digest=digest, before_record=watch.raise_if_cancelled)


def _reuse_for_targets(rt, job: dict, intermediate: dict) -> list[str]:
    """Targets that ask for exactly the intermediate get it (marked reused when an earlier job
    made it); returns the ids still to make."""
    pending = []
    for target_id, spec, status in job["targets"]:
        if status == "succeeded":
            continue
        same = (spec.format, spec.quantization) == (intermediate["format"], intermediate["quantization"])
        if not same or spec.params or not _give(rt, job, target_id, intermediate):
            pending.append(target_id)
    return pending


def _give(rt, job: dict, target_id: str, art: dict) -> bool:
    """Answer a target with a shared artifact: assigned when this job made it, reused (audited)
    when an earlier job did; False when that artifact was deleted or withdrawn meanwhile."""
    if art["job_id"] != job["id"]:
        return reuse(rt, job, target_id, art, art["recipe_hash"])
    with rt.session() as s:
        catalog.assign_target_artifact(s.get(catalog.JobTarget, target_id), art["id"])
        s.commit()
    return True


def _fail(rt, job_id: str, status: str, code: str, message: str) -> None:
    with rt.session() as s:
        catalog.finish_job(s, job_id=job_id, status=status, error_code=code, error_message=message)
        s.commit()
    log.info("job %s %s (%s: %s)", job_id, status, code, message)
