"""Sources, artifacts and lineage."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .audit import RequestInfo, record_audit
from .errors import InvalidState, NotFound
from .models import Artifact, Job, JobTarget, LineageEdge, Source, new_id, utcnow
from .search import label_pairs as search_label_pairs
from .search import metric_values, search_artifacts, search_text, search_tokens
from .withdrawal import inherit_withdrawal


def create_source(
    s: Session,
    *,
    name: str,
    sha256: str,
    size_bytes: int,
    uri: str,
    storage_key: str,
    architecture: str | None = None,
    metadata: dict[str, Any] | None = None,
    actor: str,
    request: RequestInfo | None = None,
    organization_id: str | None = None,
) -> Source:
    """``organization_id``: the owning tenant (default: the caller's, from ``request``)."""
    if organization_id is None and request is not None:
        organization_id = request.organization_id
    source = Source(
        id=new_id("src"),
        organization_id=organization_id,
        name=name,
        sha256=sha256,
        size_bytes=size_bytes,
        uri=uri,
        storage_key=storage_key,
        architecture=architecture,
        meta=dict(metadata or {}),
        created_by=actor,
        created_at=utcnow(),
    )
    s.add(source)
    s.flush()
    record_audit(
        s,
        actor=actor,
        action="source.create",
        resource_type="source",
        resource_id=source.id,
        request=request,
        details={"name": name, "sha256": sha256, "size_bytes": size_bytes, "uri": uri,
                 **({"base_model": (metadata or {})["base_model"]} if (metadata or {}).get("base_model") else {})},
    )
    return source


def _visible(row, organization_id: str | None):
    """``row`` unless it belongs to another organisation than ``organization_id`` (None: any)."""
    if row is None or (organization_id is not None and row.organization_id != organization_id):
        return None
    return row


def get_source(s: Session, *, source_id: str, organization_id: str | None = None) -> Source | None:
    return _visible(s.get(Source, source_id), organization_id)


def get_source_by_sha256(s: Session, *, sha256: str, organization_id: str | None = None) -> Source | None:
    """The oldest source with these bytes (uploads are content-addressed in storage)."""
    q = select(Source).where(Source.sha256 == sha256).order_by(Source.created_at, Source.id).limit(1)
    if organization_id is not None:
        q = q.where(Source.organization_id == organization_id)
    return s.execute(q).scalars().first()


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / ±Infinity (at any depth) as None: stored metrics and metadata
    are always valid JSON (a NaN once made every listing of its organisation answer 500). The
    engine refuses non-finite validation numbers; this is the catalog's own guarantee."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def assign_target_artifact(target: JobTarget, artifact_id: str) -> None:
    """A target is done once it has its artifact (new, or an existing one reused)."""
    target.artifact_id = artifact_id
    target.status, target.progress = "succeeded", 1.0
    target.error_code = target.error_message = None
    target.lease_expires_at = None
    target.finished_at = utcnow()


def column_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics the search columns are filled from: the quality report's mean KL and top-1
    (metrics["quality"], measured on the evaluation text, issue 13) win over the validation's
    numbers on the short probe text, which understate the damage."""
    out = dict(metrics or {})
    quality = out.get("quality")
    if isinstance(quality, dict):
        out.update({k: quality[k] for k in ("mean_kl", "top1_agreement") if k in quality})
    return out


def record_artifact(
    s: Session,
    *,
    job_id: str | None,
    target_id: str | None,
    source_id: str,
    format: str,
    quantization: str,
    sha256: str,
    size_bytes: int,
    uri: str,
    storage_key: str,
    filename: str,
    metrics: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
    engine_version: str,
    recipe: dict[str, Any],
    recipe_hash: str,
    actor: str | None = None,
    parents: list[tuple[str, str]] | None = None,
) -> Artifact:
    """Catalog an artifact, link it to its target (which becomes ``succeeded``), add the lineage
    edge source -> artifact carrying the recipe, and audit it; all in the caller's transaction.
    Idempotent per target: recording the same bytes for a target again returns the first record."""
    job = None
    if job_id is not None:
        job = s.execute(
            select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
        ).scalars().first()
        if job is None:
            raise NotFound(f"job {job_id} not found")
    source = s.get(Source, source_id)
    if source is None:
        raise NotFound(f"source {source_id} not found")
    target = None
    if target_id is not None:
        target = s.get(JobTarget, target_id)
        if target is None or (job_id is not None and target.job_id != job_id):
            raise NotFound(f"target {target_id} not found in job {job_id}")
        if target.artifact_id:
            existing = s.get(Artifact, target.artifact_id)
            if existing is not None and existing.sha256 == sha256:
                return existing
            if existing is not None:
                raise InvalidState(f"target {target_id} already has artifact {existing.id} with other bytes")
    names = search_text(filename=filename, source_name=source.name, format=format, quantization=quantization)
    artifact = Artifact(
        id=new_id("art"),
        # The job's tenant (the source's for an artifact made outside a job).
        organization_id=job.organization_id if job is not None else source.organization_id,
        job_id=job_id,
        target_id=target_id,
        source_id=source_id,
        format=format,
        quantization=quantization,
        filename=filename,
        sha256=sha256,
        size_bytes=size_bytes,
        uri=uri,
        storage_key=storage_key,
        metrics=json_safe(dict(metrics or {})),
        meta=json_safe(dict(metadata or {})),
        engine_version=engine_version,
        recipe_hash=recipe_hash,
        created_at=utcnow(),
        # copies the catalog search filters on (catalog/search.py)
        architecture=source.architecture or (metadata or {}).get("architecture"),
        label_pairs=search_label_pairs(job.labels if job is not None else None),
        search_text=names,
        search_tokens=search_tokens(names, organization_id=job.organization_id if job is not None
                                    else source.organization_id),
        **metric_values(column_metrics(metrics)),
    )
    s.add(artifact)
    # The artifact's direct inputs: the source by default, or e.g. the intermediate it was
    # quantized from.
    parents = parents or [("source", source_id)]
    for parent_type, parent_id in parents:
        s.add(
            LineageEdge(
                id=new_id("edg"),
                parent_type=parent_type,
                parent_id=parent_id,
                child_type="artifact",
                child_id=artifact.id,
                recipe=dict(recipe or {}),
                recipe_hash=recipe_hash,
                created_at=utcnow(),
            )
        )
    if target is not None:
        assign_target_artifact(target, artifact.id)
    s.flush()
    if job is not None:
        s.expire(job, ["artifacts"])
    record_audit(
        s,
        actor=actor or (f"worker:{job.worker_id}" if job is not None and job.worker_id else "system"),
        action="artifact.create",
        resource_type="artifact",
        resource_id=artifact.id,
        organization_id=artifact.organization_id,
        details={
            "job_id": job_id,
            "target_id": target_id,
            "source_id": source_id,
            "format": format,
            "quantization": quantization,
            "sha256": sha256,
            "size_bytes": size_bytes,
            "uri": uri,
            "recipe_hash": recipe_hash,
            "engine_version": engine_version,
        },
    )
    inherit_withdrawal(s, artifact=artifact, parents=[("source", source_id), *parents], actor="system")
    return artifact


def add_lineage_edge(
    s: Session,
    *,
    parent_type: str,
    parent_id: str,
    child_type: str,
    child_id: str,
    recipe: dict[str, Any] | None = None,
    recipe_hash: str | None = None,
) -> LineageEdge:
    """An extra edge (e.g. artifact -> artifact when one artifact is derived from another)."""
    edge = LineageEdge(
        id=new_id("edg"),
        parent_type=parent_type,
        parent_id=parent_id,
        child_type=child_type,
        child_id=child_id,
        recipe=dict(recipe or {}),
        recipe_hash=recipe_hash,
        created_at=utcnow(),
    )
    s.add(edge)
    s.flush()
    return edge


def get_artifact(s: Session, *, artifact_id: str, organization_id: str | None = None) -> Artifact | None:
    return _visible(s.get(Artifact, artifact_id), organization_id)


def find_artifact_by_recipe(s: Session, *, recipe_hash: str, organization_id: str | None = None) -> Artifact | None:
    """The newest artifact made by this exact recipe (for reusing identical requests); a
    withdrawn one is never reused."""
    q = (select(Artifact).where(Artifact.recipe_hash == recipe_hash, Artifact.withdrawn_at.is_(None))
         .order_by(Artifact.created_at.desc()).limit(1))
    if organization_id is not None:
        q = q.where(Artifact.organization_id == organization_id)
    return s.execute(q).scalars().first()


def list_artifacts(s: Session, **filters: Any) -> tuple[list[Artifact], str | None]:
    """One page of the catalog: ``search.search_artifacts`` (every filter, sort and cursor it
    takes, ``organization_id``, ``include_withdrawn`` and ``include_deleted`` included)."""
    return search_artifacts(s, **filters)
