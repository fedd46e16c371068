"""A job's shared work, done once: claim → fetch → preflight → lossless intermediate → hand each
remaining target to a task of its own (see target_pipeline.py).

Every way out of here leaves the job in a final state, or dispatched to its targets, or back to a
state another delivery can claim; errors are recorded and no temporary objects are left behind.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from quantyard import catalog
from quantyard.engine.errors import Cancelled, ConversionError
from quantyard.engine.spec import parse_target
from worker import metrics
from worker.limits import ScratchQuota, memory_limit, resource_limit_of, scratch_limit
from worker.outage import CatalogUnavailable, catalog_calls, is_catalog_outage
from worker.publish import publish
from worker.reuse import find_present, reuse, reuse_known_targets
from worker.runtime import WorkerRuntime
from worker.sources import SOURCE_META, fetch_artifact, fetch_gguf_source, fetch_source, pack_source_meta, source_info
from worker.speed import add_speed
from worker.watch import JobWatch, LeaseLost

log = logging.getLogger(__name__)

# dispatch(job_id, target_id, task) sends one target to its own task: `task` is the target's
# step of the plan, serialised (quantyard.engine.plan.TargetTask.to_dict).
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
            with metrics.prepare_stage("fetch", rt):
                source_dir = fetch_source(rt, job["source"], work_dir)
            report = _preflight(rt, job, source_dir, watch)
            pending, inputs = _shared_work(rt, job, source_dir, report, work_dir, watch)
        finished = _dispatch_nothing(rt, job_id, f"{len(pending)} target(s) dispatched", inputs)
        for target_id in pending:
            _send(dispatch, job_id, target_id, inputs["tasks"][target_id])
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


def _send(dispatch: Dispatch, job_id: str, target_id: str, task: dict) -> None:
    """One target's message. The job is already dispatched (its targets and their steps are in
    the catalog), so a broker that refuses (e.g. Redis restarting) must not fail the job: the
    target stays pending and the reconciler re-sends it after its grace period."""
    try:
        dispatch(job_id, target_id, task)
    except Exception as exc:  # kombu/redis raise many types; none is the job's fault
        log.warning("job %s: target %s not sent (%s); the reconciler will re-send it",
                    job_id, target_id, type(exc).__name__)


def _dispatch_nothing(rt, job_id: str, message: str, inputs: dict | None = None) -> str:
    """End the prepare stage; the job settles here when no target is left to run. `inputs`, the
    dispatch record ({"tasks": {target id: TargetTask}}), is what the reconciler re-sends from."""
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
    """The job's conversion plan (the one `quantyard convert` runs): its shared steps here, each
    made once or an earlier job's artifact reused by recipe hash; the float GGUF targets in the
    same read of the source as the intermediate. Returns the target ids still to make and the
    dispatch record ({"tasks": {target id: TargetTask}}) their messages are made of."""
    from quantyard.engine.stages import plan_for_source, source_format

    plan = plan_for_source(source_dir, [spec for _, spec, _ in job["targets"]], report=report,
                           source_sha256=job["source"]["sha256"], source_format=source_format(source_dir))
    return _PlanRun(rt, job, plan, source_dir, work_dir, watch).prepare()


class _PlanRun:
    """The prepare task's share of one plan: {step id: artifact} for every shared step made."""

    def __init__(self, rt, job: dict, plan, source_dir: Path, work_dir: Path, watch: JobWatch):
        self.rt, self.job, self.plan, self.source_dir, self.work_dir, self.watch = rt, job, plan, source_dir, work_dir, watch
        self.artifacts: dict[str, dict] = {}
        self.outputs = None  # the reference outputs, once made or fetched
        self.reference_path: Path | None = None  # ... and their file
        self.eval_paths: dict[str | None, Path] = {}  # evaluation text -> the source's reference on it
        self.evaluation_for = None  # stages.EvaluationFor, once the reference step runs
        self.pending = {tid: step for (tid, _, status), step in zip(job["targets"], plan.targets, strict=True)
                        if status != "succeeded"}

    def prepare(self) -> tuple[list[str], dict]:
        needed = self._needed()
        for step in self.plan.shared():  # reuse first: a present artifact is never made again
            if step.id in needed and step.kind != "reference" and (
                    art := find_present(self.rt, step.recipe_hash, self.job.get("organization_id"))):
                self.artifacts[step.id] = art
        if "reference" in needed:
            self._reference(needed)
        self._source_pass(needed)
        if self.reference_path is not None and "intermediate" in self.artifacts:
            if _companion(self.artifacts["intermediate"], self.reference_path.name):
                self.artifacts["reference"] = self.artifacts["intermediate"]  # stored with it
        for step in self.plan.shared():
            if step.id in needed and step.id not in self.artifacts and step.kind in ("imatrix", "onnx_fp32"):
                self.artifacts[step.id] = (self._imatrix(step) if step.kind == "imatrix" else self._onnx_fp32(step))
        given = {tid for tid, step_id in self.pending.items()
                 if step_id in self.artifacts and _give(self.rt, self.job, tid, self.artifacts[step_id])}
        tasks = {tid: self._task(step_id) for tid, step_id in self.pending.items() if tid not in given}
        return list(tasks), {"tasks": {tid: task.to_dict() for tid, task in tasks.items()}}

    def _task(self, step_id: str):
        from quantyard.engine.plan import TargetTask

        step = self.plan.step(step_id)
        if "reference" in step.inputs and "reference" not in self.artifacts:
            # an intermediate made before references were stored with it: the task computes its own
            step = dataclasses.replace(step, inputs=tuple(i for i in step.inputs if i != "reference"))
        return TargetTask(step=step, source_sha256=self.plan.source_sha256, engine_version=self.plan.engine_version,
                          source_format=self.plan.source_format,
                          artifacts={i: self.artifacts[i]["id"] for i in step.inputs})

    def _needed(self) -> set[str]:
        """The pending targets' steps and every step they read, transitively."""
        needed, todo = set(), list(self.pending.values())
        while todo:
            step = self.plan.step(todo.pop())
            if step.id not in needed:
                needed.add(step.id)
                todo.extend(step.inputs)
        return needed

    def _provenance(self, digest: str | None) -> dict:
        from quantyard.engine.stages import step_provenance

        return step_provenance(source_sha256=self.plan.source_sha256, name=self.job["source"]["name"],
                               stamp=True, digest=digest)

    def _publish(self, result, key: str, step, target_id: str | None = None) -> dict:
        recipe, digest = step.artifact_recipe({})
        return publish(self.rt, job_id=self.job["id"], target_id=target_id, source_id=self.job["source"]["id"],
                       result=result, key=f"artifacts/{self.job['id']}/{key}/{result.path.name}", recipe=recipe,
                       digest=digest, before_record=self.watch.raise_if_cancelled)

    def _reference(self, needed: set[str]) -> None:
        """The source's reference outputs, stored with the intermediate (a companion file, like
        llama.cpp's --kl-divergence-base file beside a model): a reused intermediate's are
        downloaded (a few MB); else they are computed once here, for this task's validations
        and, uploaded with the new intermediate, for every target task's."""
        from quantyard.engine.gguf.reference import ReferenceOutputs
        from quantyard.engine.stages import REFERENCE_FILE, make_reference

        path = self.work_dir / REFERENCE_FILE
        stored = _companion(self.artifacts.get("intermediate"), REFERENCE_FILE)
        if stored is not None:
            self.rt.store.download_file(stored["key"], path)
            self.outputs, self.reference_path = ReferenceOutputs.load(path), path
        elif any(s.id in needed and s.id not in self.artifacts for s in self.plan.source_pass()):
            self.watch.progress(0.12, "reference outputs of the source", force=True)
            with metrics.prepare_stage("reference", self.rt):
                self.outputs, self.reference_path = make_reference(self.source_dir, path), path
        from quantyard.engine.stages import cached_evaluations

        evaluation_for = cached_evaluations(self._eval_reference)
        targets = set(self.pending.values())

        def for_targets(spec):  # an intermediate no target asked for is not evaluated
            steps = [s for s in self.plan.source_pass() if s.spec == spec]
            return evaluation_for(spec) if not steps or any(s.id in targets for s in steps) else None

        self.evaluation_for = for_targets

    def _eval_reference(self, text: str | None):
        """The source's reference on an evaluation text: the reused intermediate's stored one,
        else computed here (and, with a new intermediate, stored beside it for the target tasks)."""
        from quantyard.engine.evaluation import EvalReference
        from quantyard.engine.stages import eval_reference_filename, make_eval_reference

        chunks = self.rt.settings.evaluation_chunks or None
        name = eval_reference_filename(text, chunks)
        path = self.work_dir / name
        stored = _companion(self.artifacts.get("intermediate"), name)
        if stored is not None:
            self.rt.store.download_file(stored["key"], path)
            return EvalReference.load(path)
        self.watch.progress(0.13, "evaluate: reference outputs of the source on the evaluation text", force=True)
        with metrics.prepare_stage("evaluate", self.rt):
            ref = make_eval_reference(self.source_dir, path, text=text, chunks=chunks)
        self.eval_paths[text] = path
        return ref

    def _source_pass(self, needed: set[str]) -> None:
        """One read of the source writes the intermediate (unless reused) and every pending float
        target; each is validated against the reference outputs, then published."""
        from quantyard.engine.stages import phase_of, run_source_pass

        steps = [s for s in self.plan.source_pass() if s.id in needed and s.id not in self.artifacts]
        if not steps:
            return
        if self.evaluation_for is not None and any(s.kind == "intermediate" for s in steps):
            for step_id in self.pending.values():  # stored with the new intermediate for the target tasks
                self.evaluation_for(self.plan.step(step_id).spec)
        with metrics.stage_clock("intermediate", fmt="prepare", hardware_class=metrics.hardware_class_of(self.rt)) \
                as clock:
            def on_progress(fraction: float, message: str) -> None:
                clock.mark(phase_of(message, clock.current))  # writing the files, validating, evaluating
                self.watch.progress(0.15 + 0.7 * fraction, f"source pass: {message}")

            made = run_source_pass(self.source_dir, self.plan, steps, self.work_dir / "pass",
                                   provenance=self._provenance(None), validate=[s.id for s in steps],
                                   stem=None, outputs=self.outputs, progress=on_progress,
                                   evaluation_for=self.evaluation_for)
        if "intermediate" in made and self.reference_path is not None:  # what target tasks need of the source
            meta = pack_source_meta(self.source_dir, self.work_dir / SOURCE_META)
            inter = _with_companion(_with_companion(made["intermediate"], self.reference_path), meta)
            for path in self.eval_paths.values():
                inter = _with_companion(inter, path)
            made["intermediate"] = inter
        keys = {step_id: tid for tid, step_id in reversed(self.pending.items())}
        for step in steps:
            if step.id in keys:  # a target (not the intermediate): timed on this worker
                add_speed(self.rt, made[step.id], progress=lambda f, m: self.watch.progress(0.85, m, force=True))
        self.watch.progress(0.86, "source pass: uploading", force=True)
        with metrics.prepare_stage("upload", self.rt):
            for step in steps:  # a target's file under its target id, as target tasks store theirs
                self.artifacts[step.id] = self._publish(made[step.id], keys.get(step.id, step.id), step)

    def _intermediate_file(self) -> Path:
        local = self.work_dir / "pass" / self.artifacts["intermediate"]["filename"]
        return local if local.exists() else fetch_artifact(self.rt, self.artifacts["intermediate"], self.work_dir)

    def _imatrix(self, step) -> dict:
        """An importance matrix (format "imatrix") from its calibration text, made once."""
        from quantyard import engine
        from quantyard.engine.results import ConversionResult
        from quantyard.engine.stages import calibration_for, compute_imatrix, imatrix_filename

        path = self.work_dir / imatrix_filename(step)

        def on_progress(fraction: float, message: str) -> None:
            self.watch.progress(0.9 + 0.08 * fraction, message)

        with metrics.prepare_stage("imatrix", self.rt):
            info = compute_imatrix(self.source_dir, self._intermediate_file(), path,
                                   text=calibration_for(self.plan, step), progress=on_progress)
        result = ConversionResult(path=path, format="imatrix", quantization="imatrix",
                                  size_bytes=path.stat().st_size, metadata={"imatrix": info},
                                  metrics={}, engine_version=engine.ENGINE_VERSION)
        return self._publish(result, f"imatrix/{step.spec.params['calibration'][:16]}", step)

    def _onnx_fp32(self, step) -> dict:
        """The fp32 ONNX export the job's ONNX targets are quantized from, made once."""
        from quantyard import engine

        start = 0.9 if "intermediate" in self.artifacts else 0.1  # after the GGUF work, when both

        def on_progress(fraction: float, message: str) -> None:
            self.watch.progress(start + (0.98 - start) * fraction, f"onnx fp32 export: {message}")

        with metrics.prepare_stage("export", self.rt):
            result = engine.convert(self.source_dir, step.spec, self.work_dir / "onnx-fp32", progress=on_progress,
                                    provenance=self._provenance(step.recipe_hash))
        self.watch.progress(0.98, "onnx fp32 export: uploading", force=True)
        return self._publish(result, "onnx-fp32", step)


def _companion(art: dict | None, name: str) -> dict | None:
    """The companion file `name` stored with an artifact, if it has one."""
    files = ((art or {}).get("metadata") or {}).get("companion_files") or []
    return next((c for c in files if c.get("name") == name), None)


def _with_companion(result, path: Path):
    """The result with `path` uploaded beside its file (publish stores metadata["files"])."""
    beside = result.path.parent / path.name
    if beside != path:
        shutil.copyfile(path, beside)
    files = list(result.metadata.get("files") or [result.path.name])
    return dataclasses.replace(result, metadata={**result.metadata, "files": [*files, path.name]})


def _prepare_gguf_source(rt, job: dict, work_dir: Path, watch: JobWatch) -> tuple[list, dict]:
    """A GGUF source is its own intermediate: check it, warn when it is already quantized."""
    from quantyard.engine.plan import TargetTask, plan_conversion
    from quantyard.engine.stages import preflight_gguf

    path = fetch_gguf_source(rt, job["source"], work_dir)
    specs = [spec for _, spec, _ in job["targets"]]
    report = preflight_gguf(path, specs, memory_limit_bytes=memory_limit(rt.settings))
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
    plan = plan_conversion(source_sha256=job["source"]["sha256"], targets=specs, source_format="gguf")
    tasks = {tid: TargetTask(step=plan.step(step_id), source_sha256=plan.source_sha256,
                             engine_version=plan.engine_version, source_format="gguf").to_dict()
             for (tid, _, status), step_id in zip(job["targets"], plan.targets, strict=True) if status != "succeeded"}
    return list(tasks), {"tasks": tasks}


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
