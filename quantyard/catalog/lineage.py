"""Lineage queries: what a source or artifact came from (upstream) and what was made from it
(downstream), over any depth, with the recipe of every edge.

One recursive CTE per direction walks ``lineage_edges`` in the database (SQLite and Postgres
alike). Without a depth limit it is a set of (type, id) rows joined with UNION, so a cycle ends
the recursion instead of looping; with a limit it carries the depth and stops there. Distances
are then the shortest ones (breadth-first over the edges fetched), so a node reachable along two
paths (a quantized model made from the intermediate *and* the imatrix) is listed once.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from sqlalchemy import and_, literal, or_, select
from sqlalchemy.orm import Session

from .errors import InvalidArgument, NotFound
from .models import Artifact, LineageEdge, Source

Node = tuple[str, str]  # ("source" | "artifact", id)

DIRECTIONS = ("upstream", "downstream", "both")
MAX_DEPTH = 100  # the most the API lets a caller ask for; None (unlimited) is not capped


def _model(node_type: str):
    return Source if node_type == "source" else Artifact


def _ends(upstream: bool):
    """(near type, near id, far type, far id) columns: walking up goes child -> parent."""
    e = LineageEdge.__table__.c
    if upstream:
        return e.child_type, e.child_id, e.parent_type, e.parent_id
    return e.parent_type, e.parent_id, e.child_type, e.child_id


def _visible(query, node_type, node_id, organization_id: str | None):
    """Rows of another organisation are invisible, and the walk does not pass through them."""
    if organization_id is None:
        return query
    return query.where(or_(
        and_(node_type == "source", node_id.in_(select(Source.id).where(Source.organization_id == organization_id))),
        and_(node_type == "artifact",
             node_id.in_(select(Artifact.id).where(Artifact.organization_id == organization_id))),
    ))


def _reach_cte(start: Node, upstream: bool, depth: int | None, organization_id: str | None):
    near_type, near_id, far_type, far_id = _ends(upstream)
    edges = LineageEdge.__table__
    cols = [far_type.label("node_type"), far_id.label("node_id")]
    base = select(*cols, *([literal(1).label("depth")] if depth else [])).where(
        near_type == start[0], near_id == start[1])
    reach = _visible(base, far_type, far_id, organization_id).cte("reach", recursive=True)
    step = select(*cols, *([(reach.c.depth + 1).label("depth")] if depth else [])).select_from(
        edges.join(reach, and_(near_type == reach.c.node_type, near_id == reach.c.node_id)))
    if depth:
        step = step.where(reach.c.depth < depth)
    return reach.union(_visible(step, far_type, far_id, organization_id))


def reachable_edges(s: Session, *, start: Node, upstream: bool, depth: int | None = None,
                    organization_id: str | None = None) -> tuple[dict[Node, int], list[tuple[LineageEdge, int]]]:
    """Nodes reachable from ``start`` in one direction (``start`` itself excluded) with their
    shortest distance, and the edges among them as (edge, depth of its far end), nearest first."""
    reach = _reach_cte(start, upstream, depth, organization_id)
    _, _, far_type, far_id = _ends(upstream)
    ids = select(reach.c.node_type, reach.c.node_id).distinct().subquery()
    q = (select(LineageEdge).join(ids, and_(far_type == ids.c.node_type, far_id == ids.c.node_id))
         .order_by(LineageEdge.created_at, LineageEdge.id))
    edges = list(s.execute(q).scalars())

    def near(e: LineageEdge) -> Node:
        return (e.child_type, e.child_id) if upstream else (e.parent_type, e.parent_id)

    def far(e: LineageEdge) -> Node:
        return (e.parent_type, e.parent_id) if upstream else (e.child_type, e.child_id)

    allowed = {far(e) for e in edges} | {start}
    edges = [e for e in edges if near(e) in allowed]  # an edge into the graph from outside it is not lineage
    by_near: dict[Node, list[LineageEdge]] = {}
    for e in edges:
        by_near.setdefault(near(e), []).append(e)
    dist: dict[Node, int] = {start: 0}
    queue = deque([start])
    while queue:  # breadth-first: shortest distances, each node once (cycle-safe)
        node = queue.popleft()
        for e in by_near.get(node, []):
            if far(e) not in dist:
                dist[far(e)] = dist[node] + 1
                queue.append(far(e))
    dist = {n: d for n, d in dist.items() if depth is None or d <= depth}
    kept = [(e, dist[far(e)]) for e in edges if far(e) in dist and near(e) in dist and far(e) != start]
    dist.pop(start)
    return dist, kept


def _summaries(s: Session, nodes: set[Node]) -> dict[Node, dict[str, Any]]:
    out: dict[Node, dict[str, Any]] = {}
    src_ids = [i for t, i in nodes if t == "source"]
    art_ids = [i for t, i in nodes if t == "artifact"]
    for src in s.execute(select(Source).where(Source.id.in_(src_ids))).scalars() if src_ids else []:
        out[("source", src.id)] = {"name": src.name, "sha256": src.sha256, "architecture": src.architecture,
                                   "uri": src.uri, **src.withdrawal_dict()}
    for art in s.execute(select(Artifact).where(Artifact.id.in_(art_ids))).scalars() if art_ids else []:
        out[("artifact", art.id)] = {"format": art.format, "quantization": art.quantization,
                                     "filename": art.filename, "sha256": art.sha256, "size_bytes": art.size_bytes,
                                     "engine_version": art.engine_version, **art.withdrawal_dict(),
                                     # retention: a deleted node keeps its edges and shows as deleted
                                     "deleted": art.deleted_at is not None, "purged": art.purged_at is not None}
    return out


def _imatrices(s: Session, edges: list[LineageEdge]) -> dict[str, dict[str, Any]]:
    """The importance matrices edges name by sha256: id, calibration and provenance."""
    shas = {(e.recipe or {}).get("imatrix_sha256") for e in edges} - {None}
    if not shas:
        return {}
    rows = s.execute(select(Artifact).where(Artifact.format == "imatrix", Artifact.sha256.in_(shas))
                     .order_by(Artifact.created_at)).scalars()
    out: dict[str, dict[str, Any]] = {}
    for art in rows:
        info = dict((art.meta or {}).get("imatrix") or {})
        out.setdefault(art.sha256, {"artifact_id": art.id, "sha256": art.sha256,
                                    "dataset": info.get("dataset"), "entries_count": info.get("entries_count"),
                                    "chunks_count": info.get("chunks_count")})
    return out


def edge_recipe(recipe: dict[str, Any], imatrices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How an edge's child was made, spelled out: converter, target, parameters, engine version
    and its inputs (the source bytes, the intermediate, the importance matrix and its
    calibration text)."""
    target = dict(recipe.get("target") or {})
    params = dict(target.get("params") or {})
    inputs: dict[str, Any] = {"source_sha256": recipe.get("input_sha256")}
    if recipe.get("intermediate_sha256"):
        inputs["intermediate_sha256"] = recipe["intermediate_sha256"]
    if recipe.get("imatrix_sha256"):
        inputs["imatrix"] = imatrices.get(recipe["imatrix_sha256"], {"sha256": recipe["imatrix_sha256"]})
    if "calibration_text" in params or "calibration" in params:
        # The text itself can be long; its sha256 identifies it (as the imatrix recipe does).
        import hashlib

        text = params.get("calibration_text")
        inputs["calibration"] = (hashlib.sha256(text.encode()).hexdigest() if isinstance(text, str)
                                 else params.get("calibration"))
    return {"converter": recipe.get("converter"), "format": target.get("format"),
            "quantization": target.get("quantization"), "parameters": params,
            "engine_version": recipe.get("engine_version"), "inputs": inputs}


def _start(s: Session, node_type: str, node_id: str, organization_id: str | None):
    row = s.get(_model(node_type), node_id)
    if row is None or (organization_id is not None and row.organization_id != organization_id):
        raise NotFound(f"{node_type} {node_id} not found")
    return row


def lineage(s: Session, *, artifact_id: str | None = None, source_id: str | None = None,
            direction: str = "both", depth: int | None = None,
            organization_id: str | None = None) -> dict[str, Any]:
    """The lineage graph around one artifact or source.

    ``{"node", "artifact_id"|"source_id", "direction", "depth", "upstream": [...],
    "downstream": [...], "edges": [...]}``. Each node is ``{"type", "id", "exists", "depth",
    "recipe_hash", "recipe", "withdrawn", "withdrawal", ...summary}``, nearest first; its
    ``recipe`` is that of the edge that reached it (upstream: its child's). Each edge is
    ``{"id", "parent", "child", "recipe", "recipe_hash", "created_at", "made_by"}`` with
    ``made_by`` spelling the recipe out (:func:`edge_recipe`). ``depth`` None is unlimited."""
    if (artifact_id is None) == (source_id is None):
        raise InvalidArgument("give exactly one of artifact_id and source_id")
    if direction not in DIRECTIONS:
        raise InvalidArgument(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
    if depth is not None and depth < 1:
        raise InvalidArgument(f"depth must be at least 1, not {depth}")
    start: Node = ("artifact", artifact_id) if artifact_id is not None else ("source", str(source_id))
    _start(s, *start, organization_id)
    sides: dict[str, tuple[dict[Node, int], list[tuple[LineageEdge, int]]]] = {}
    for name, upstream in (("upstream", True), ("downstream", False)):
        if direction in (name, "both"):
            sides[name] = reachable_edges(s, start=start, upstream=upstream, depth=depth,
                                          organization_id=organization_id)
    all_edges = {e.id: e for _, edges in sides.values() for e, _ in edges}
    summaries = _summaries(s, {n for dist, _ in sides.values() for n in dist} | {start})
    imatrices = _imatrices(s, list(all_edges.values()))
    out: dict[str, Any] = {
        "node": {"type": start[0], "id": start[1], **summaries.get(start, {})},
        f"{start[0]}_id": start[1], "direction": direction, "depth": depth,
        "upstream": [], "downstream": [],
    }
    for name, (dist, edges) in sides.items():
        with_start = {start: 0, **dist}
        first_edge: dict[Node, LineageEdge] = {}
        for e, d in edges:
            far = (e.parent_type, e.parent_id) if name == "upstream" else (e.child_type, e.child_id)
            near = (e.child_type, e.child_id) if name == "upstream" else (e.parent_type, e.parent_id)
            if with_start.get(near) == d - 1:
                first_edge.setdefault(far, e)
        out[name] = [
            {"type": n[0], "id": n[1], "exists": n in summaries, **summaries.get(n, {}), "depth": d,
             "recipe_hash": first_edge[n].recipe_hash, "recipe": dict(first_edge[n].recipe or {})}
            for n, d in sorted(dist.items(), key=lambda item: item[1])
        ]
    out["edges"] = [{**e.to_dict(), "made_by": edge_recipe(dict(e.recipe or {}), imatrices)}
                    for e in all_edges.values()]
    return out


def descendants(s: Session, *, node_type: str, node_id: str,
                organization_id: str | None = None) -> dict[Node, int]:
    """Every node made from this one, any depth, with its distance (cycle-safe)."""
    dist, _ = reachable_edges(s, start=(node_type, node_id), upstream=False, organization_id=organization_id)
    return dist
