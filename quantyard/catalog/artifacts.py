"""Sources, artifacts and lineage."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from .audit import RequestInfo, record_audit
from .errors import InvalidState, NotFound
from .models import Artifact, Job, JobTarget, LineageEdge, Source, new_id, utcnow
from .pagination import paginate

MAX_LINEAGE_DEPTH = 50


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
) -> Source:
    source = Source(
        id=new_id("src"),
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
        details={"name": name, "sha256": sha256, "size_bytes": size_bytes, "uri": uri},
    )
    return source


def get_source(s: Session, *, source_id: str) -> Source | None:
    return s.get(Source, source_id)


def get_source_by_sha256(s: Session, *, sha256: str) -> Source | None:
    """The oldest source with these bytes (uploads are content-addressed in storage)."""
    q = select(Source).where(Source.sha256 == sha256).order_by(Source.created_at, Source.id).limit(1)
    return s.execute(q).scalars().first()


def assign_target_artifact(target: JobTarget, artifact_id: str) -> None:
    """A target is done once it has its artifact (new, or an existing one reused)."""
    target.artifact_id = artifact_id
    target.status, target.progress = "succeeded", 1.0
    target.error_code = target.error_message = None
    target.lease_expires_at = None
    target.finished_at = utcnow()


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
    if s.get(Source, source_id) is None:
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
    artifact = Artifact(
        id=new_id("art"),
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
        metrics=dict(metrics or {}),
        meta=dict(metadata or {}),
        engine_version=engine_version,
        recipe_hash=recipe_hash,
        created_at=utcnow(),
    )
    s.add(artifact)
    # The artifact's direct inputs: the source by default, or e.g. the intermediate it was
    # quantized from.
    for parent_type, parent_id in parents or [("source", source_id)]:
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


def get_artifact(s: Session, *, artifact_id: str) -> Artifact | None:
    return s.get(Artifact, artifact_id)


def find_artifact_by_recipe(s: Session, *, recipe_hash: str) -> Artifact | None:
    """The newest artifact made by this exact recipe (for reusing identical requests)."""
    q = select(Artifact).where(Artifact.recipe_hash == recipe_hash).order_by(Artifact.created_at.desc()).limit(1)
    return s.execute(q).scalars().first()


def _like_pattern(q: str) -> str:
    escaped = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def list_artifacts(
    s: Session,
    *,
    format: str | None = None,
    quantization: str | None = None,
    source_id: str | None = None,
    q: str | None = None,
    job_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Artifact], str | None]:
    """Newest first. ``format`` and ``quantization`` match case-insensitively; ``q`` searches
    filename, format, quantization, sha256 prefix and the source's name."""
    query = select(Artifact)
    if format:
        query = query.where(Artifact.format == format.lower())
    if quantization:
        query = query.where(func.upper(Artifact.quantization) == quantization.upper())
    if source_id:
        query = query.where(Artifact.source_id == source_id)
    if job_id:
        query = query.where(Artifact.job_id == job_id)
    if q:
        pattern = _like_pattern(q)
        source_names = select(Source.id).where(func.lower(Source.name).like(pattern, escape="\\"))
        query = query.where(
            or_(
                func.lower(Artifact.filename).like(pattern, escape="\\"),
                func.lower(Artifact.format).like(pattern, escape="\\"),
                func.lower(Artifact.quantization).like(pattern, escape="\\"),
                Artifact.sha256.startswith(q.lower()),
                Artifact.source_id.in_(source_names),
            )
        )
    return paginate(s, query, Artifact, limit=limit, cursor=cursor)


def _node(s: Session, node_type: str, node_id: str) -> dict[str, Any]:
    if node_type == "source":
        src = s.get(Source, node_id)
        summary = (
            {"name": src.name, "sha256": src.sha256, "architecture": src.architecture, "uri": src.uri}
            if src else None
        )
    else:
        art = s.get(Artifact, node_id)
        summary = (
            {"format": art.format, "quantization": art.quantization, "filename": art.filename,
             "sha256": art.sha256, "size_bytes": art.size_bytes}
            if art else None
        )
    return {"type": node_type, "id": node_id, "exists": summary is not None, **(summary or {})}


def _walk(s: Session, start: tuple[str, str], upstream: bool) -> tuple[list[dict], list[LineageEdge]]:
    seen = {start}
    frontier = [start]
    nodes: list[dict[str, Any]] = []
    edges: list[LineageEdge] = []
    for depth in range(1, MAX_LINEAGE_DEPTH + 1):
        if not frontier:
            break
        next_frontier = []
        for node_type, node_id in frontier:
            if upstream:
                q = select(LineageEdge).where(LineageEdge.child_type == node_type, LineageEdge.child_id == node_id)
            else:
                q = select(LineageEdge).where(LineageEdge.parent_type == node_type, LineageEdge.parent_id == node_id)
            for edge in s.execute(q.order_by(LineageEdge.created_at, LineageEdge.id)).scalars():
                edges.append(edge)
                other = (edge.parent_type, edge.parent_id) if upstream else (edge.child_type, edge.child_id)
                if other in seen:
                    continue
                seen.add(other)
                next_frontier.append(other)
                nodes.append({**_node(s, *other), "depth": depth, "recipe_hash": edge.recipe_hash,
                              "recipe": dict(edge.recipe or {})})
        frontier = next_frontier
    return nodes, edges


def lineage(s: Session, *, artifact_id: str) -> dict[str, Any]:
    """``{"artifact_id", "upstream": [...], "downstream": [...], "edges": [...]}``; each node is
    ``{"type", "id", "depth", "recipe_hash", "recipe", ...summary}``, nearest first."""
    if s.get(Artifact, artifact_id) is None:
        raise NotFound(f"artifact {artifact_id} not found")
    up_nodes, up_edges = _walk(s, ("artifact", artifact_id), upstream=True)
    down_nodes, down_edges = _walk(s, ("artifact", artifact_id), upstream=False)
    return {
        "artifact_id": artifact_id,
        "upstream": up_nodes,
        "downstream": down_nodes,
        "edges": [e.to_dict() for e in up_edges + down_edges],
    }
