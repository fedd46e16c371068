"""The artifact catalog: list, get, download, lineage."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from quantyard import cards, catalog

from api.deps import actor, get_session, request_info
from api.errors import ApiError, not_found

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


def _get(s: Session, artifact_id: str):
    art = catalog.get_artifact(s, artifact_id=artifact_id)
    if art is None:
        raise not_found("artifact", artifact_id)
    return art


def lineage_summary(graph: dict) -> dict:
    def ids(nodes):
        return [n.get("id") if isinstance(n, dict) else n for n in nodes]

    up, down = graph.get("upstream", []), graph.get("downstream", [])
    return {"upstream": ids(up), "downstream": ids(down)}


@router.get("", summary="Browse the artifact catalog (newest first)")
def list_artifacts(format: str | None = Query(None), quantization: str | None = Query(None),
                   source: str | None = Query(None, description="source id"),
                   q: str | None = Query(None, max_length=200, description="free text"),
                   limit: int = Query(50, ge=1, le=500), cursor: str | None = Query(None),
                   s: Session = Depends(get_session)):
    try:
        items, next_cursor = catalog.list_artifacts(s, format=format, quantization=quantization, source_id=source,
                                                    q=q, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise ApiError(400, "invalid_cursor", f"invalid cursor: {exc}") from None
    return {"items": [a.to_dict() for a in items], "next_cursor": next_cursor}


@router.get("/{artifact_id}", summary="An artifact's metadata, metrics and lineage summary")
def get_artifact(artifact_id: str, s: Session = Depends(get_session)):
    art = _get(s, artifact_id)
    data = art.to_dict()
    data.setdefault("download_url", f"/v1/artifacts/{artifact_id}/download")
    data["lineage"] = lineage_summary(catalog.lineage(s, artifact_id=artifact_id))
    return data


def _content_disposition(filename: str) -> str:
    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"


def _file_of(art, name: str | None) -> tuple[str, str, str]:
    """(storage key, filename, sha256) of the artifact's main file, or of the companion file
    (external data, a later shard) called `name`."""
    main = art.filename or art.storage_key.rsplit("/", 1)[-1]
    if name is None or name == main:
        return art.storage_key, main, art.sha256
    companions = (art.meta or {}).get("companion_files", [])
    for companion in companions:
        if companion["name"] == name:
            return companion["key"], companion["name"], companion["sha256"]
    names = [main] + [c["name"] for c in companions]
    raise ApiError(404, "file_not_found", f"artifact {art.id} has no file {name!r}; its files: {', '.join(names)}")


@router.get("/{artifact_id}/download",
            summary="The artifact's bytes (a redirect to a presigned URL on S3); ?file= for a companion file")
def download_artifact(artifact_id: str, request: Request,
                      file: str | None = Query(None, max_length=500,
                                               description="one of metadata.companion_files' names"),
                      s: Session = Depends(get_session)):
    art = _get(s, artifact_id)
    store = request.app.state.store
    key, filename, sha256 = _file_of(art, file)
    url = store.presigned_url(key, expires_s=3600, filename=filename)
    size = None
    if url is None:
        size = store.stat(key)
        if size is None:
            raise ApiError(404, "object_missing", f"the bytes of {filename} of artifact {artifact_id} are missing "
                           "from the store")
    catalog.record_audit(s, actor=actor(request), action="artifact.download", resource_type="artifact",
                         resource_id=artifact_id, outcome="success", request=request_info(request),
                         details={"mode": "redirect" if url else "stream", "file": filename})
    s.commit()
    if url is not None:
        return RedirectResponse(url, status_code=307)
    headers = {
        "Content-Disposition": _content_disposition(filename),
        "Content-Length": str(size),
        "ETag": f'"{sha256}"',
        "X-Content-SHA256": sha256,
    }
    return StreamingResponse(store.iter_bytes(key), media_type="application/octet-stream", headers=headers)


@router.get("/{artifact_id}/lineage", summary="Upstream and downstream lineage graph")
def artifact_lineage(artifact_id: str, s: Session = Depends(get_session)):
    _get(s, artifact_id)
    graph = catalog.lineage(s, artifact_id=artifact_id)
    return {"artifact_id": artifact_id, **graph}


def _card_inputs(s: Session, artifact_id: str) -> tuple[dict, dict, dict]:
    art = _get(s, artifact_id)
    source = catalog.get_source(s, source_id=art.source_id)
    if source is None:
        raise ApiError(404, "source_missing", f"the source {art.source_id} of artifact {artifact_id} is not in the "
                       "catalog")
    return art.to_dict(), source.to_dict(), catalog.lineage(s, artifact_id=artifact_id)


@router.get("/{artifact_id}/card", summary="A model card (Markdown, Hugging Face YAML front matter)",
            response_class=Response, responses={200: {"content": {"text/markdown": {}}}})
def artifact_card(artifact_id: str, s: Session = Depends(get_session)):
    text = cards.model_card(*_card_inputs(s, artifact_id))
    return Response(text, media_type="text/markdown; charset=utf-8")


@router.get("/{artifact_id}/bom", summary="A CycloneDX 1.6 ML-BOM (hashes, pedigree, model card, formulation)",
            response_class=Response, responses={200: {"content": {cards.BOM_MEDIA_TYPE: {}}}})
def artifact_bom(artifact_id: str, request: Request, s: Session = Depends(get_session)):
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    bom = cards.ml_bom(*_card_inputs(s, artifact_id), timestamp=now, base_url=str(request.base_url))
    return Response(json.dumps(bom, indent=2), media_type=cards.BOM_MEDIA_TYPE)
