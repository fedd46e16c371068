"""One target of a dispatched job, as its own task: claim the target → parse its step of the
job's plan (the message) → fetch the files of its input steps (the lossless GGUF or the shared
ONNX fp32 export, an importance matrix, the reference outputs) and the source → the engine's
run_target_step (quantize + validate, as `quantyard convert` does) → upload → record → settle.

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
from quantyard.engine.plan import InvalidPlan, TargetTask, kind_of
from quantyard.engine.spec import parse_target, split_max_bytes
from worker import metrics
from worker.limits import ScratchQuota, resource_limit_of, scratch_limit
from worker.outage import CatalogUnavailable, catalog_calls, is_catalog_outage
from worker.publish import publish
from worker.reuse import find_present, reuse
from worker.runtime import WorkerRuntime
from worker.sources import (
    SOURCE_META,
    fetch_artifact,
    fetch_gguf_source,
    fetch_source,
    source_info,
    unpack_source_meta,
)
from worker.speed import add_speed
from worker.watch import LeaseLost, TargetWatch

log = logging.getLogger(__name__)


def run_target(rt: WorkerRuntime, job_id: str, target_id: str, message: dict) -> str:
    """Make one target if this delivery may claim it; returns the claim outcome, the target's
    final status, or "lease_lost". `message`: the target's step of the job's plan
    (TargetTask.to_dict), parsed strictly; one that does not parse fails the target. Raises
    ``CatalogUnavailable`` when the catalog cannot be reached (the message must be kept)."""
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
        return _run_claimed(rt, job_id, target_id, message, watch)


def _run_claimed(rt, job_id: str, target_id: str, message: dict, watch: TargetWatch) -> str:
    work_dir = Path(tempfile.mkdtemp(prefix=f"{target_id}-", dir=rt.scratch_dir))
    watch.scratch = ScratchQuota(work_dir, scratch_limit(rt.settings))
    try:
        job = _load(rt, job_id, target_id, message)
        if _reused(rt, job):  # made by an identical recipe since the job was prepared
            return "succeeded"
        watch.progress(0.02, "fetching inputs", force=True)
        with metrics.target_stage("fetch", rt, job["spec"]):
            source, files, outputs, evaluation = _fetch(rt, job, work_dir)
        _make_and_publish(rt, job, source, files, outputs, work_dir, watch, evaluation)
        return "succeeded"
    except InvalidPlan as exc:  # not a message this engine sent: nothing of it can be trusted
        return _close(rt, target_id, "failed", "invalid_message", f"the target's message is invalid: {exc}")
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


def _load(rt, job_id: str, target_id: str, message: dict) -> dict:
    """The job, the target's step (checked against the catalog: the step must be for this
    target's spec and this job's source) and the artifacts of its input steps."""
    task = TargetTask.from_dict(message)
    with rt.session() as s:
        job = catalog.get_job(s, job_id=job_id)
        source = catalog.get_source(s, source_id=job.source_id)
        target = s.get(catalog.JobTarget, target_id)
        if target is None or target.job_id != job_id or parse_target(target.to_spec_dict()) != task.step.spec:
            raise InvalidPlan(f"its step is not this target's ({task.step.spec.key})")
        if source.sha256 != task.source_sha256:
            raise InvalidPlan("its step is for another source")
        inputs = {step_id: _artifact(s, art_id, job) for step_id, art_id in task.artifacts.items()}
        return {
            "id": job.id,
            "organization_id": getattr(job, "organization_id", None),
            "target_id": target_id,
            "task": task,
            "spec": task.step.spec,
            "source": source_info(source),
            "inputs": inputs,
        }


def _artifact(s, artifact_id: str, job) -> dict:
    art = catalog.get_artifact(s, artifact_id=artifact_id)
    org = getattr(job, "organization_id", None)
    if org is not None and art.organization_id != org:  # never another tenant's file
        raise InvalidPlan(f"input artifact {artifact_id} is not this organisation's")
    return art.to_dict()


def _fetch(rt, job: dict, work_dir: Path):
    """The input steps' files, the reference outputs (loaded from where the prepare task stored
    them, beside the intermediate: never computed here), and the source: a GGUF source's file;
    for a GGUF target with stored reference outputs only the source's files but its weights
    (stored beside them too: the tokenizer checks need no more); else the unpacked archive."""
    from quantyard.engine.evaluation import EvalReference
    from quantyard.engine.gguf.reference import ReferenceOutputs
    from quantyard.engine.stages import REFERENCE_FILE, eval_reference_filename, evaluation_text

    fetched: dict[str, Path] = {}  # artifact id -> its main file (companions beside it)
    files = {}
    for step_id, art in job["inputs"].items():
        if art["id"] not in fetched:
            fetched[art["id"]] = fetch_artifact(rt, art, work_dir / art["id"])
        files[step_id] = fetched[art["id"]]
    outputs = None
    if "reference" in files:
        files["reference"] = files["reference"].parent / REFERENCE_FILE
        outputs = ReferenceOutputs.load(files["reference"])
    task = job["task"]
    meta = files["reference"].parent / SOURCE_META if outputs is not None else None
    # the source's reference on this target's evaluation text, stored beside the intermediate
    name = eval_reference_filename(evaluation_text(task.step.spec), rt.settings.evaluation_chunks or None)
    stored = files["reference"].parent / name if outputs is not None else None
    evaluation = EvalReference.load(stored) if stored is not None and stored.is_file() else None
    if task.source_format == "gguf":
        source = fetch_gguf_source(rt, job["source"], work_dir)
    elif meta is not None and meta.is_file() and task.step.input_of("intermediate") and evaluation is not None:
        source = unpack_source_meta(rt, meta, work_dir / "src")
    else:  # also to compute an evaluation reference the intermediate does not have
        source = fetch_source(rt, job["source"], work_dir / "src")
    return source, files, outputs, evaluation


def _make_and_publish(rt, job: dict, source: Path, files: dict[str, Path], outputs,
                      work_dir: Path, watch: TargetWatch, evaluation=None) -> None:
    """Run the step with the engine (the same call `quantyard convert` makes), then upload,
    record and settle. A GGUF target of a Hugging Face source without a stored evaluation
    reference (an intermediate made before them, or another evaluation text) computes its own."""
    from quantyard.engine.stages import (
        evaluation_text,
        make_eval_reference,
        run_target_step,
        step_provenance,
    )

    task, spec = job["task"], job["spec"]
    recipe, digest = _recipe(job)
    # lineage: the files it is made from (the reference only checked it)
    parents = [("artifact", a["id"]) for i, a in job["inputs"].items() if kind_of(i) != "reference"]

    provenance = step_provenance(source_sha256=task.source_sha256, name=job["source"]["name"], stamp=True,
                                 digest=digest)
    if evaluation is None and spec.format == "gguf" and task.source_format == "hf":
        watch.progress(0.04, "evaluate: reference outputs of the source on the evaluation text", force=True)
        with metrics.target_stage("evaluate", rt, spec):
            evaluation = make_eval_reference(source, text=evaluation_text(spec),
                                             chunks=rt.settings.evaluation_chunks or None)
    known = _known_presets(rt, job, evaluation) if spec.quantization == "auto" else None
    first = "quantize" if spec.format == "gguf" else "export"
    with metrics.stage_clock(first, fmt=spec.format, hardware_class=metrics.hardware_class_of(rt)) as clock:
        result = run_target_step(task.step, source, work_dir / "out", source_format=task.source_format, files=files,
                                 outputs=outputs, provenance=provenance, split_max_bytes=split_max_bytes(spec)
                                 if spec.format == "gguf" else None, progress=_step_progress(watch, clock), evaluation=evaluation,
                                 evaluation_chunks=rt.settings.evaluation_chunks or None, known=known)
    with metrics.target_stage("speed", rt, spec):
        add_speed(rt, result, progress=lambda f, m: watch.progress(0.9, m, force=True))
    watch.progress(0.92, "uploading", force=True)
    with metrics.target_stage("upload", rt, spec):
        publish(rt, job_id=job["id"], target_id=job["target_id"], source_id=job["source"]["id"],
                result=result, key=f"artifacts/{job['id']}/{job['target_id']}/{result.path.name}",
                recipe=recipe, digest=digest, parents=parents or None,
                before_record=watch.raise_if_cancelled)  # settles the job in the same transaction


def _step_progress(watch: TargetWatch, clock: metrics.StageClock):
    """The engine step's progress: the job's (the upload takes the rest), and the step's phases
    (quantize or export, validate, evaluate) timed one by one."""
    from quantyard.engine.stages import phase_of

    def on_progress(fraction: float, message: str) -> None:
        clock.mark(phase_of(message, clock.current))
        watch.progress(0.05 + 0.85 * fraction, message)
    return on_progress


def _known_presets(rt, job: dict, evaluation) -> dict:
    """gguf:auto reuses the presets this source already has, made from the same intermediate
    (and imatrix) and measured on the same evaluation text (catalog.frontier.known_presets)."""
    from quantyard.catalog.frontier import known_presets
    from quantyard.engine.gguf.auto_budget import parse_auto_budget
    from quantyard.engine.manifest import ENGINE_VERSION
    from quantyard.engine.spec import parse_size

    if evaluation is None:
        return {}
    parents = [a["id"] for i, a in job["inputs"].items() if kind_of(i) != "reference"]
    with catalog_calls(), rt.session() as s:
        return known_presets(s, source_id=job["source"]["id"],
                             presets=parse_auto_budget(job["spec"].params, parse_size).presets, parents=parents,
                             engine_version=ENGINE_VERSION, text_sha256=evaluation.text_sha256,
                             n_ctx=evaluation.n_ctx, n_chunks=evaluation.n_chunks)


def _recipe(job: dict) -> tuple[dict, str]:
    """The artifact's recipe: the step's, with the digests of the files it is made from."""
    return job["task"].step.artifact_recipe({i: a["sha256"] for i, a in job["inputs"].items()})


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
