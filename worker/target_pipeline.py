"""One target of a dispatched job, as its own task: claim the target → fetch the intermediate
(the lossless GGUF, or the shared ONNX fp32 export) and the source, to validate against →
quantize + validate → upload → record → settle the job.

Targets of one job run in parallel on as many workers as there are; the job finishes when its
last target does (catalog.settle_job).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from quantyard import catalog
from quantyard.engine.errors import Cancelled, ConversionError
from quantyard.engine.spec import parse_target, split_max_bytes
from worker.limits import ScratchQuota, resource_limit_of, scratch_limit
from worker.outage import CatalogUnavailable, catalog_calls, is_catalog_outage
from worker.publish import publish, target_recipe
from worker.reuse import find_present, reuse
from worker.runtime import WorkerRuntime
from worker.sources import fetch_artifact, fetch_gguf_source, fetch_source, source_info
from worker.watch import LeaseLost, TargetWatch

log = logging.getLogger(__name__)


def run_target(rt: WorkerRuntime, job_id: str, target_id: str, inputs: dict) -> str:
    """Make one target if this delivery may claim it; returns the claim outcome, the target's
    final status, or "lease_lost". Raises ``CatalogUnavailable`` when the catalog cannot be
    reached (the message must be kept, not dropped)."""
    with catalog_calls(), rt.session() as s:
        outcome = catalog.claim_target(
            s, target_id=target_id, worker_id=rt.worker_id,
            lease_s=rt.settings.job_lease_s, max_attempts=rt.settings.job_max_attempts,
        )
        s.commit()
    if outcome.kind != "claimed":
        log.info("target %s of job %s not run: %s", target_id, job_id, outcome.kind)
        return outcome.kind
    with TargetWatch(rt, job_id, target_id, rt.settings.job_lease_s) as watch:
        return _run_claimed(rt, job_id, target_id, inputs, watch)


def _run_claimed(rt, job_id: str, target_id: str, inputs: dict, watch: TargetWatch) -> str:
    work_dir = Path(tempfile.mkdtemp(prefix=f"{target_id}-", dir=rt.scratch_dir))
    watch.scratch = ScratchQuota(work_dir, scratch_limit(rt.settings))
    try:
        job = _load(rt, job_id, target_id, inputs)
        if _reused(rt, job):  # made by an identical recipe since the job was prepared
            return "succeeded"
        watch.progress(0.02, "fetching inputs", force=True)
        if inputs.get("source_gguf"):  # a GGUF source is both the input and the reference
            reference = intermediate = fetch_gguf_source(rt, job["source"], work_dir)
        else:
            reference = fetch_source(rt, job["source"], work_dir / "src")
            intermediate = (fetch_artifact(rt, job["intermediate"], work_dir)
                            if job["intermediate"] else None)
        imatrix = fetch_artifact(rt, job["imatrix"], work_dir) if job["imatrix"] else None
        _make_and_publish(rt, job, reference, intermediate, imatrix, work_dir, watch)
        return "succeeded"
    except LeaseLost as exc:
        log.warning("target %s of job %s: %s; leaving it to that worker", target_id, job_id, exc)
        return "lease_lost"
    except Cancelled as exc:
        return _close(rt, target_id, "cancelled", "cancelled", str(exc))
    except ConversionError as exc:
        exc = resource_limit_of(exc, rt.settings) or exc  # e.g. an allocation failure, wrapped
        return _close(rt, target_id, "failed", exc.code, str(exc))
    except BaseException as exc:  # a bug or a time limit: record it, then let Celery see it
        if (limit := resource_limit_of(exc, rt.settings)) is not None:  # memory, time
            return _close(rt, target_id, "failed", limit.code, str(limit))
        if is_catalog_outage(exc):  # nothing can be recorded: the lease lapses, the target is redone
            raise CatalogUnavailable(f"the catalog became unreachable: {type(exc).__name__}") from exc
        code = "time_limit" if type(exc).__name__ == "SoftTimeLimitExceeded" else "internal_error"
        _close(rt, target_id, "failed", code, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _load(rt, job_id: str, target_id: str, inputs: dict) -> dict:
    with rt.session() as s:
        job = catalog.get_job(s, job_id=job_id)
        source = catalog.get_source(s, source_id=job.source_id)
        target = s.get(catalog.JobTarget, target_id)
        # Each format has its own intermediate: the lossless GGUF for GGUF targets, the shared
        # fp32 export for the ONNX targets prepare gave it to; an ONNX target without one is
        # converted from the source (and its recipe names no intermediate).
        if target.format == "gguf":
            intermediate_id = inputs.get("intermediate_artifact_id")
        else:
            intermediate_id = (inputs.get("onnx_fp32_artifact_ids") or {}).get(target_id)
        intermediate = (catalog.get_artifact(s, artifact_id=intermediate_id).to_dict()
                        if intermediate_id else None)
        imatrix_id = (inputs.get("imatrix_artifact_ids") or {}).get(target_id)
        imatrix = catalog.get_artifact(s, artifact_id=imatrix_id) if imatrix_id else None
        return {
            "id": job.id,
            "organization_id": getattr(job, "organization_id", None),
            "target_id": target_id,
            "imatrix": imatrix.to_dict() if imatrix is not None else None,
            "spec": parse_target(target.to_spec_dict()),
            "source": source_info(source),
            "intermediate": intermediate,
        }


def _make_and_publish(rt, job: dict, reference: Path, input_file: Path | None,
                      imatrix: Path | None, work_dir: Path, watch: TargetWatch) -> None:
    """Quantize the intermediate (the GGUF one, or the ONNX fp32 export) — or, with none,
    convert straight from the source — then upload, record and settle."""
    from quantyard import engine
    from quantyard.engine.stages import quantize

    spec = job["spec"]
    intermediate, imatrix_artifact = job["intermediate"], job["imatrix"]
    recipe, digest = _recipe(job)
    parents = [("artifact", a["id"]) for a in (intermediate, imatrix_artifact) if a]

    def on_progress(fraction: float, message: str) -> None:
        watch.progress(0.05 + 0.85 * fraction, message)  # the upload takes the rest

    out_dir = work_dir / "out"
    provenance = {"source_sha256": job["source"]["sha256"], "recipe_hash": digest,
                  "name": job["source"]["name"] or ""}
    if input_file is None:
        result = engine.convert(reference, spec, out_dir, progress=on_progress,
                                provenance=provenance)
    elif spec.format == "onnx":  # validated against the source, not the fp32 file
        result = engine.quantize_onnx(reference, input_file, spec, out_dir, progress=on_progress,
                                      provenance=provenance)
    else:
        result = quantize(input_file, spec, out_dir, reference=reference, imatrix=imatrix,
                          progress=on_progress, provenance=provenance,
                          split_max_bytes=split_max_bytes(spec))
    watch.progress(0.92, "uploading", force=True)
    publish(rt, job_id=job["id"], target_id=job["target_id"], source_id=job["source"]["id"],
            result=result, key=f"artifacts/{job['id']}/{job['target_id']}/{result.path.name}",
            recipe=recipe, digest=digest, parents=parents or None,
            before_record=watch.raise_if_cancelled)  # settles the job in the same transaction


def _recipe(job: dict) -> tuple[dict, str]:
    from quantyard.engine.manifest import ENGINE_VERSION

    intermediate, imatrix = job["intermediate"], job["imatrix"]
    return target_recipe(
        source_sha256=job["source"]["sha256"], spec=job["spec"], engine_version=ENGINE_VERSION,
        inputs={"intermediate_sha256": intermediate["sha256"] if intermediate else None,
                "imatrix_sha256": imatrix["sha256"] if imatrix else None})


def _reused(rt, job: dict) -> bool:
    """Answer the target with a present artifact of its exact recipe, then settle the job."""
    _, digest = _recipe(job)
    art = find_present(rt, digest, job.get("organization_id"))
    if art is None or not reuse(rt, job, job["target_id"], art, digest):
        return False
    with rt.session() as s:
        catalog.settle_job(s, job_id=job["id"])
        s.commit()
    return True


def _close(rt, target_id: str, status: str, code: str, message: str) -> str:
    with rt.session() as s:
        catalog.finish_target(s, target_id=target_id, status=status, error_code=code,
                              error_message=message)
        s.commit()
    log.info("target %s %s (%s: %s)", target_id, status, code, message)
    return status
