"""The artifact catalog: list, get, download, lineage."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from api.auth import requires
from api.deps import actor, caller_may_use_withdrawn, get_session, mark_audit, org_id, request_info
from api.errors import CATALOG_DOWN, ApiError, not_found, out_of_range
from api.responses import dumps
from quantyard import cards, catalog
from quantyard.catalog.lineage import MAX_DEPTH as MAX_LINEAGE_DEPTH
from quantyard.catalog.search import make_filters

# Sizes are stored as signed 64-bit integers.
MAX_SIZE = 2**63 - 1
TIME = {"format": "date-time"}  # ISO 8601 query parameters, as the schema shows them

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


def _get(s: Session, artifact_id: str, request: Request):
    """The artifact, if the caller's organisation owns it (another tenant's is a 404 like a missing one)."""
    art = catalog.get_artifact(s, artifact_id=artifact_id, organization_id=org_id(request))
    if art is None:
        raise not_found("artifact", artifact_id)
    return art


def lineage_summary(graph: dict) -> dict:
    def ids(nodes):
        return [n.get("id") if isinstance(n, dict) else n for n in nodes]

    up, down = graph.get("upstream", []), graph.get("downstream", [])
    return {"upstream": ids(up), "downstream": ids(down)}


@router.get("", dependencies=[requires("viewer")],
            summary="Search the artifact catalog (filters, stable sort, cursor pagination)")
def list_artifacts(request: Request,
                   format: str | None = Query(None, max_length=50, description="gguf, onnx (any case)"),
                   quantization: str | None = Query(None, max_length=50, description="e.g. Q4_K_M (any case)"),
                   architecture: str | None = Query(None, max_length=200, description="e.g. LlamaForCausalLM"),
                   source: str | None = Query(None, max_length=40, description="source id"),
                   label: list[str] | None = Query(None, description="key=value (repeat: all must match)"),
                   min_size: int | None = Query(None, ge=0, le=MAX_SIZE, description="bytes"),
                   max_size: int | None = Query(None, ge=0, le=MAX_SIZE, description="bytes"),
                   created_after: str | None = Query(None, min_length=1, max_length=40, json_schema_extra=TIME,
                                                     description="ISO 8601 (inclusive)"),
                   created_before: str | None = Query(None, min_length=1, max_length=40, json_schema_extra=TIME,
                                                      description="ISO 8601 (exclusive)"),
                   max_mean_kl: float | None = Query(None, ge=0, allow_inf_nan=False,
                                                     description="GGUF: mean KL vs the source"),
                   min_top1: float | None = Query(None, ge=0, le=1, allow_inf_nan=False,
                                                  description="GGUF: top-1 agreement"),
                   min_cosine: float | None = Query(None, ge=0, le=1, allow_inf_nan=False,
                                                    description="ONNX: worst cosine"),
                   max_bits_per_weight: float | None = Query(None, ge=0, allow_inf_nan=False),
                   q: str | None = Query(None, max_length=200, description="free text: file or source name, "
                                         "format, quantization, or a sha256 prefix (8+ hex digits)"),
                   sort: str = Query("created", pattern="^(created|size|mean_kl)$",
                                     description="created (newest first), size (smallest first), "
                                                 "mean_kl (lowest first; artifacts with a KL only)"),
                   limit: int = Query(50, ge=1, le=500),
                   cursor: str | None = Query(None, max_length=1000, description="next_cursor of the previous page"),
                   include_withdrawn: bool = Query(False, description="also list withdrawn artifacts "
                                                   "(and those flagged by an ancestor's withdrawal)"),
                   include_deleted: bool = Query(False, description="also list soft-deleted artifacts "
                                                 "(to find one to restore)"),
                   s: Session = Depends(get_session)):
    # Bad values: 422 naming the parameter (InvalidArgument), bad cursor: 400 (api/errors.py).
    check_times(created_after=created_after, created_before=created_before)
    try:
        items, next_cursor = catalog.list_artifacts(
            s, format=format, quantization=quantization, architecture=architecture, source_id=source, label=label,
            min_size=min_size, max_size=max_size, created_after=created_after, created_before=created_before,
            max_mean_kl=max_mean_kl, min_top1=min_top1, min_cosine=min_cosine,
            max_bits_per_weight=max_bits_per_weight, q=q, sort=sort, limit=limit, cursor=cursor,
            include_withdrawn=include_withdrawn, include_deleted=include_deleted, organization_id=org_id(request))
    except (OverflowError, sa_exc.StatementError) as exc:
        if cursor is None or isinstance(exc, CATALOG_DOWN):  # range-checked parameters; outages: 503
            raise
        # A cursor decodes to a key the catalog cannot compare (a size past 64 bits): not one we wrote.
        raise ApiError(400, "invalid_cursor", "invalid cursor: its key is out of range",
                       details={"parameter": "cursor"}) from None
    return {"items": [a.to_dict() for a in items], "next_cursor": next_cursor}


def check_times(**times: str | None) -> None:
    """The catalog parses the times; one that leaves years 1-9999 once in UTC is a 422 naming it."""
    for name, value in times.items():
        try:
            make_filters(**{name: value})
        except OverflowError:
            raise out_of_range(name, value, "years 1-9999 in UTC") from None


@router.get("/{artifact_id}", dependencies=[requires("viewer")],
            summary="An artifact's metadata, metrics and lineage summary")
def get_artifact(artifact_id: str, request: Request, s: Session = Depends(get_session)):
    art = _get(s, artifact_id, request)
    data = art.to_dict()
    data.setdefault("download_url", f"/v1/artifacts/{artifact_id}/download")
    data["lineage"] = lineage_summary(catalog.lineage(s, artifact_id=artifact_id, organization_id=org_id(request)))
    return data


def check_download_allowed(art, *, allow_withdrawn: bool, may_use_withdrawn: bool) -> dict | None:
    """A withdrawn artifact (or one flagged by an ancestor's withdrawal) is refused with 410
    naming the withdrawn node and the reason, unless a maintainer asks with allow_withdrawn;
    returns the withdrawal being overridden (None when there is none)."""
    withdrawal = catalog.withdrawal_of(art)
    if withdrawal is None:
        return None
    root = withdrawal["root"]
    via = "" if root["id"] == art.id else f" because {root['type']} {root['id']} was withdrawn"
    details = {"artifact_id": art.id, "withdrawn_root": root, "reason": withdrawal["reason"],
               "withdrawn_at": withdrawal["at"]}
    if not allow_withdrawn:
        raise ApiError(410, "withdrawn", f"artifact {art.id} is withdrawn{via}: {withdrawal['reason']} "
                       "(a maintainer may still download it with ?allow_withdrawn=true)", details=details)
    if not may_use_withdrawn:
        raise ApiError(403, "forbidden", f"artifact {art.id} is withdrawn{via}; only a maintainer may download "
                       "it with allow_withdrawn", details=details)
    return withdrawal


class WithdrawIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(..., min_length=1, max_length=2000, description="why it is withdrawn (kept in the audit)")


def lineage_params(direction: str = Query("both", pattern="^(upstream|downstream|both)$"),
                   depth: int | None = Query(None, ge=1, le=MAX_LINEAGE_DEPTH,
                                             description="hops to follow; unlimited when left out")) -> dict:
    return {"direction": direction, "depth": depth}


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


@router.get("/{artifact_id}/download", dependencies=[requires("viewer")],
            summary="The artifact's bytes (a redirect to a presigned URL on S3); ?file= for a companion file",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                "format": "binary"}}},
                             "description": "the file's bytes"},
                       307: {"description": "a redirect to a presigned URL of the object store"}})
def download_artifact(artifact_id: str, request: Request,
                      file: str | None = Query(None, max_length=500,
                                               description="one of metadata.companion_files' names"),
                      allow_withdrawn: bool = Query(False, description="maintainers: download even though the "
                                                    "artifact (or an ancestor) is withdrawn"),
                      may_use_withdrawn: bool = Depends(caller_may_use_withdrawn),
                      s: Session = Depends(get_session)):
    art = _get(s, artifact_id, request)
    refuse_deleted(art)
    withdrawal = check_download_allowed(art, allow_withdrawn=allow_withdrawn, may_use_withdrawn=may_use_withdrawn)
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
                         details={"mode": "redirect" if url else "stream", "file": filename,
                                  **({"withdrawal": withdrawal} if withdrawal else {})})
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


@router.get("/{artifact_id}/lineage", dependencies=[requires("viewer")],
            summary="Upstream and downstream lineage graph, any depth, with the recipe of every edge")
def artifact_lineage(artifact_id: str, request: Request, params: dict = Depends(lineage_params),
                     s: Session = Depends(get_session)):
    _get(s, artifact_id, request)
    return catalog.lineage(s, artifact_id=artifact_id, organization_id=org_id(request), **params)


@router.post("/{artifact_id}/withdraw", dependencies=[requires("maintainer")],
             summary="Withdraw an artifact and flag everything made from it")
def withdraw_artifact(artifact_id: str, request: Request, body: WithdrawIn = Body(...),
                      s: Session = Depends(get_session)):
    """[role: maintainer] Withdraw an artifact with a reason: it and every descendant are flagged,
    hidden from default listings and refused for download. Withdrawing again keeps the first reason."""
    mark_audit(request, "artifact.withdraw", "artifact", artifact_id)
    _get(s, artifact_id, request)
    result = catalog.withdraw_artifact(s, artifact_id=artifact_id, reason=body.reason, actor=actor(request),
                                       request=request_info(request), organization_id=org_id(request))
    s.commit()
    return result


class ReinstateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(..., min_length=1, max_length=2000, description="why the withdrawal is undone (audited)")


@router.post("/{artifact_id}/reinstate", dependencies=[requires("admin")],
             summary="Undo an artifact's withdrawal (and the flags it put on everything made from it)")
def reinstate_artifact(artifact_id: str, request: Request, body: ReinstateIn = Body(...),
                       s: Session = Depends(get_session)):
    """[role: admin, as lifting a legal hold] Undo the withdrawal of this artifact. Only the
    withdrawn node itself: one flagged through an ancestor is a 409 naming that ancestor. Its
    descendants are cleared too, except those that still come from another withdrawn node (they
    take that one's flag: ``still_withdrawn``)."""
    mark_audit(request, "artifact.reinstate", "artifact", artifact_id)
    _get(s, artifact_id, request)
    result = catalog.reinstate(s, node_type="artifact", node_id=artifact_id, reason=body.reason,
                               actor=actor(request), request=request_info(request), organization_id=org_id(request))
    s.commit()
    return result


def _card_inputs(s: Session, artifact_id: str, request: Request) -> tuple[dict, dict, dict]:
    art = _get(s, artifact_id, request)
    source = catalog.get_source(s, source_id=art.source_id, organization_id=org_id(request))
    if source is None:
        raise ApiError(404, "source_missing", f"the source {art.source_id} of artifact {artifact_id} is not in the "
                       "catalog")
    return art.to_dict(), source.to_dict(), catalog.lineage(s, artifact_id=artifact_id,
                                                            organization_id=org_id(request))


@router.get("/{artifact_id}/card", dependencies=[requires("viewer")],
            summary="A model card (Markdown, Hugging Face YAML front matter)",
            response_class=Response, responses={200: {"content": {"text/markdown": {}}}})
def artifact_card(artifact_id: str, request: Request, s: Session = Depends(get_session)):
    text = cards.model_card(*_card_inputs(s, artifact_id, request))
    return Response(text, media_type="text/markdown; charset=utf-8")


@router.get("/{artifact_id}/bom", dependencies=[requires("viewer")],
            summary="A CycloneDX 1.6 ML-BOM (hashes, pedigree, model card, formulation)",
            response_class=Response, responses={200: {"content": {cards.BOM_MEDIA_TYPE: {}}}})
def artifact_bom(artifact_id: str, request: Request, s: Session = Depends(get_session)):
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    bom = cards.ml_bom(*_card_inputs(s, artifact_id, request), timestamp=now, base_url=str(request.base_url))
    return Response(dumps(bom, indent=2), media_type=cards.BOM_MEDIA_TYPE)  # NaN metrics as null


# ------------------------------------------------------------------ retention: delete, restore, legal hold


def refuse_deleted(art) -> None:
    """A deleted artifact's bytes are not served (410), whether or not they are purged yet."""
    if art.deleted_at is None:
        return
    gone = "its bytes were purged" if art.purged_at is not None else \
        f"it can be restored until {catalog.models.iso(art.purge_after)}"
    raise ApiError(410, "deleted", f"artifact {art.id} was deleted by {art.deleted_by}; {gone}",
                   details={"artifact_id": art.id, **art.retention_dict()["deletion"]})


# A purged artifact is gone for good (410); the other refusals are conflicts with its state (409).
_RETENTION_STATUS = {"purged": 410, "reason_required": 422}


def _retention(call):
    try:
        return call()
    except catalog.RetentionConflict as exc:
        raise ApiError(_RETENTION_STATUS.get(exc.code, 409), exc.code, str(exc)) from None


class DeleteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=2000, description="why it is deleted (kept in the audit)")


class LegalHoldIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(..., min_length=1, max_length=2000, description="the matter or order behind the hold")


class LegalHoldReleaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=2000)


@router.delete("/{artifact_id}", dependencies=[requires("maintainer")],
               summary="Soft-delete an artifact (bytes purged after the grace period)")
def delete_artifact(artifact_id: str, request: Request, body: DeleteIn | None = Body(None),
                    s: Session = Depends(get_session)):
    """[role: maintainer] Hidden from listings, downloads answer 410, restorable until purge_after; 409
    legal_hold while held. Artifacts derived from it stay available; lineage edges stay."""
    mark_audit(request, "artifact.delete", "artifact", artifact_id)
    _get(s, artifact_id, request)
    grace_s = request.app.state.settings.retention_grace_s
    art = _retention(lambda: catalog.delete_artifact(
        s, artifact_id=artifact_id, actor=actor(request), reason=body.reason if body else None, grace_s=grace_s,
        request=request_info(request)))
    derived = catalog.retention.derived_artifact_ids(s, artifact_id=artifact_id)
    s.commit()
    return {**art.to_dict(), "derived_artifacts": derived}


@router.post("/{artifact_id}/restore", dependencies=[requires("maintainer")],
             summary="Undo a delete within the grace period")
def restore_artifact(artifact_id: str, request: Request, s: Session = Depends(get_session)):
    """[role: maintainer] 409 not_deleted when it is not deleted, 410 purged once its bytes are gone."""
    mark_audit(request, "artifact.restore", "artifact", artifact_id)
    art = _get(s, artifact_id, request)
    if art.deleted_at is not None and art.purged_at is None:
        store = request.app.state.store  # a purge that failed half-way must not be restored as whole
        missing = [k for k in catalog.retention.artifact_keys(art) if store.stat(k) is None]
        if missing:
            raise ApiError(410, "purged", f"artifact {artifact_id} cannot be restored: {len(missing)} of its "
                           "objects are gone from the store", details={"missing": missing})
    art = _retention(lambda: catalog.restore_artifact(s, artifact_id=artifact_id, actor=actor(request),
                                                      request=request_info(request)))
    s.commit()
    return art.to_dict()


@router.put("/{artifact_id}/legal-hold", dependencies=[requires("maintainer")],
            summary="Place a legal hold: no delete, no purge")
def put_legal_hold(artifact_id: str, body: LegalHoldIn, request: Request, s: Session = Depends(get_session)):
    """[role: maintainer] Also on a deleted artifact (stops its purge); 410 purged once the bytes are gone."""
    mark_audit(request, "artifact.legal_hold", "artifact", artifact_id)
    _get(s, artifact_id, request)
    art = _retention(lambda: catalog.set_legal_hold(s, artifact_id=artifact_id, reason=body.reason,
                                                    actor=actor(request), request=request_info(request)))
    s.commit()
    return art.to_dict()


@router.delete("/{artifact_id}/legal-hold", dependencies=[requires("admin")],
               summary="Release a legal hold")
def delete_legal_hold(artifact_id: str, request: Request, body: LegalHoldReleaseIn | None = Body(None),
                      s: Session = Depends(get_session)):
    """[role: admin] Admin, not maintainer: the hold exists to stop the people who can delete
    (maintainers) from deleting, so the same role must not be able to lift it and then delete."""
    mark_audit(request, "artifact.legal_hold_release", "artifact", artifact_id)
    _get(s, artifact_id, request)
    art = _retention(lambda: catalog.release_legal_hold(
        s, artifact_id=artifact_id, actor=actor(request), reason=body.reason if body else None,
        request=request_info(request)))
    s.commit()
    return art.to_dict()
