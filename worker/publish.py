"""Put a validated file (and the files that travel with it) in the object store and record it
in the catalog, or neither."""

from __future__ import annotations

from pathlib import Path

from quantyard import catalog
from quantyard.engine.errors import Cancelled
from quantyard.engine.plan import artifact_recipe


def target_recipe(*, source_sha256: str, spec, engine_version: str, inputs: dict) -> tuple[dict, str]:
    """The recipe of an artifact: its source, what was asked, by which engine, from which
    inputs (intermediate, importance matrix) — hashed for reuse and lineage. The engine's plan
    defines it (engine/plan.py artifact_recipe; a step's own: Step.artifact_recipe)."""
    return artifact_recipe(source_sha256=source_sha256, spec=spec, engine_version=engine_version, inputs=inputs)


def companion_paths(result) -> list[Path]:
    """Files an artifact can't be used without, beside its main file: an ONNX model's external
    data (`model.onnx.data`, over protobuf's 2 GB limit) or a split GGUF's later shards. The
    engine lists every file of an artifact in metadata["files"], the main one first."""
    names = result.metadata.get("files") or []
    return [result.path.parent / n for n in names if n != result.path.name]


def made_on(worker_id: str) -> dict:
    """The worker that made (and, for ONNX, timed) an artifact: speed metrics mean nothing
    without the hardware they were measured on."""
    from worker.hardware import detect

    info = detect().to_dict()
    return {"worker_id": worker_id, "hardware_class": worker_id.rsplit(":", 1)[-1],
            "machine": info["machine"], "cpu_count": info["cpu_count"], "cpu_flags": info["cpu_flags"]}


def _hold_or_raise(s, *, job_id: str | None, target_id: str | None, worker_id: str) -> None:
    if job_id is None or catalog.hold_for_record(s, job_id=job_id, target_id=target_id, worker_id=worker_id):
        return
    from worker.watch import LeaseLost

    job = catalog.get_job(s, job_id=job_id)
    s.refresh(job)
    if job.status == "running" and not job.cancel_requested:
        raise LeaseLost("this worker lost its lease to another worker before recording")
    raise Cancelled("the job was cancelled before its artifact was recorded")


def publish(rt, *, job_id: str, target_id: str | None, source_id: str, result, key: str,
            recipe: dict, digest: str, parents: list[tuple[str, str]] | None = None,
            before_record=None) -> dict:
    """Upload `result.path` at `key` (companions beside it), then record the artifact
    (+ lineage, + audit) in one transaction; if anything fails every uploaded object is
    deleted again.

    The record is conditional (``catalog.hold_for_record``, in the same transaction): only while
    the job runs without a cancel request and this worker still holds the target (or, for the
    prepare stage's shared artifacts, the job). Otherwise nothing is recorded, the objects are
    deleted and ``Cancelled`` (``LeaseLost`` when another worker holds it now) is raised, so a
    cancel accepted during the upload wins. A target's artifact settles its job in that same
    transaction: a later cancel finds the job finished (409) instead of answering 202 to a job
    that then succeeds."""
    uploaded: list[str] = []
    try:
        stored = rt.store.put_file(key, result.path)
        uploaded.append(stored.key)
        companions = []
        for path in companion_paths(result):
            extra = rt.store.put_file(f"{key.rsplit('/', 1)[0]}/{path.name}", path)
            uploaded.append(extra.key)
            companions.append({"name": path.name, "key": extra.key, "sha256": extra.sha256,
                               "size_bytes": extra.size_bytes})
        metadata = dict(result.metadata, made_on=made_on(rt.worker_id))
        if companions:
            metadata["companion_files"] = companions
            metadata["total_size_bytes"] = stored.size_bytes + sum(c["size_bytes"] for c in companions)
        if before_record is not None:
            before_record()
        with rt.session() as s:
            _hold_or_raise(s, job_id=job_id, target_id=target_id, worker_id=rt.worker_id)
            artifact = catalog.record_artifact(
                s, job_id=job_id, target_id=target_id, source_id=source_id,
                format=result.format, quantization=result.quantization, sha256=stored.sha256,
                size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
                filename=result.path.name, metrics=result.metrics, metadata=metadata,
                engine_version=result.engine_version, recipe=recipe, recipe_hash=digest,
                parents=parents,
            )
            data = artifact.to_dict()
            if target_id is not None and job_id is not None:
                catalog.settle_job(s, job_id=job_id)
            s.commit()
        return data
    except BaseException:
        for uploaded_key in uploaded:  # never leave bytes the catalog does not know about
            rt.store.delete(uploaded_key)
        raise
