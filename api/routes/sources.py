"""POST /v1/sources (upload a model archive or files), GET /v1/sources/{id}."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import uploads
from api.auth import requires
from api.deps import actor, get_session, mark_audit, org_id, request_info
from api.errors import ApiError, not_found
from api.responses import JSONResponse
from api.routes.artifacts import ReinstateIn, WithdrawIn, lineage_params
from quantyard import archive, catalog
from quantyard.cards import facts
from quantyard.catalog import frontier

router = APIRouter(prefix="/v1/sources", tags=["sources"])


def source_json(source) -> dict:
    return source.to_dict()


def store_source(request: Request, path: Path, *, name: str | None, received: uploads.Received | None = None,
                 uri: str | None = None, storage_key: str | None = None, base_model: str | None = None) -> dict:
    """Check the archive at ``path``, store it (unless it already lives at ``storage_key``) and
    record the source. ``base_model``: a Hugging Face repo id, already normalised ("org/name"),
    kept in the source's metadata. Runs in a worker thread."""
    app = request.app
    settings = app.state.settings
    checked = uploads.check_source_archive(path, settings)
    store = app.state.store
    if received is None:
        sha256, size = uploads.hash_file(path)
    else:
        sha256, size = received.sha256, received.size_bytes
    with app.state.session_factory() as s:
        existing = catalog.get_source_by_sha256(s, sha256=sha256, organization_id=org_id(request))
    uploaded = None  # the key this request stored, removed again if the source isn't recorded
    if storage_key is None:
        extension = "gguf" if checked.kind == "gguf" else archive.EXTENSIONS[checked.kind]
        key = f"sources/{sha256}/source.{extension}"
        if existing is not None and existing.storage_key == key and store.stat(key) == size:
            # Same bytes already stored (content-addressed key): record a new source, skip the upload.
            uri, storage_key = existing.uri, key
        else:
            stored = store.put_file(key, path)
            if stored.sha256 != sha256:  # the store hashed what it uploaded; it must match what we got
                store.delete(key)
                raise ApiError(500, "internal_error", "stored bytes differ from the uploaded bytes")
            uri, storage_key = stored.uri, stored.key
            uploaded = stored.key
    elif existing is not None and existing.storage_key == storage_key:
        return source_json(existing)  # this object was registered before
    display_name = name or _default_name(checked, sha256)
    metadata = uploads.source_metadata(checked)
    if base_model is not None:  # the caller's word wins over a repo URL read from a GGUF header
        metadata["base_model"] = base_model
    try:
        with app.state.session_factory() as s:
            source = catalog.create_source(
                s,
                name=display_name,
                sha256=sha256,
                size_bytes=size,
                uri=uri,
                storage_key=storage_key,
                architecture=checked.architecture,
                metadata=metadata,
                actor=actor(request),
                request=request_info(request),
            )
            s.commit()
            return source_json(source)
    except BaseException:
        if uploaded is not None:
            _forget_upload(app, uploaded, sha256)
        raise


def _forget_upload(app, key: str, sha256: str) -> None:
    """The row (or its audit record) was refused: the bytes just stored must not stay behind,
    unless a source of any organisation already points at the same content-addressed key."""
    with app.state.session_factory() as s:
        known = catalog.get_source_by_sha256(s, sha256=sha256)
    if known is None or known.storage_key != key:
        app.state.store.delete(key)


def _default_name(checked: uploads.CheckedSource, sha256: str) -> str:
    guess = checked.config.get("name" if checked.kind == "gguf" else "_name_or_path")
    if isinstance(guess, str) and guess.strip() and not guess.startswith("/"):
        return guess.strip()[:200]
    if checked.root:
        return checked.root[:200]
    return f"source-{sha256[:12]}"


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "A model folder as one archive (.tar, .tar.gz or .zip; the kind is detected from "
                       "the bytes), or multipart/form-data with one 'files' part per model file.",
        "content": {
            "application/gzip": {"schema": {"type": "string", "format": "binary"}},
            "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        },
    }
}


# Hub paths that are not model repos: "https://huggingface.co/spaces/x" is no base model.
_NOT_MODEL_NAMESPACES = {"datasets", "spaces", "docs", "blog", "models", "settings", "organizations"}


def parse_base_model(value: str | None) -> str | None:
    """The ``base_model`` query parameter as "org/name" (None when absent); 400 naming it when
    it is neither a Hugging Face repo id nor a huggingface.co model URL."""
    if value is None or not value.strip():
        return None
    repo = facts.hf_repo_id(value)
    if repo is None or repo.split("/", 1)[0].lower() in _NOT_MODEL_NAMESPACES or ".." in repo:
        raise ApiError(400, "invalid_base_model",
                       f"base_model {value!r} is not a Hugging Face model repo id: give \"org/name\" "
                       "(e.g. meta-llama/Llama-3.2-1B) or https://huggingface.co/org/name",
                       details={"parameter": "base_model"})
    return repo


@router.post("", status_code=201, summary="Upload a model (an archive body, or multipart 'files')",
             openapi_extra=_UPLOAD_BODY, dependencies=[requires("submitter")])
async def upload_source(request: Request, name: str | None = Query(None, max_length=200),
                        base_model: str | None = Query(
                            None, max_length=300,
                            description="the Hugging Face repo the model comes from: \"org/name\" or "
                                        "https://huggingface.co/org/name; model cards and ML-BOMs name it "
                                        "as base_model (kept as metadata.base_model, \"org/name\")")):
    mark_audit(request, "source.create", "source")
    repo = parse_base_model(base_model)  # before the body is read: a typo costs no upload
    settings = request.app.state.settings
    limit = settings.max_upload_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in uploads.ARCHIVE_TYPES and content_type != uploads.MULTIPART:
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {content_type or '(none)'!r} is not accepted; send "
                       "application/gzip, application/x-tar or application/zip (or multipart/form-data "
                       "with 'files' parts)")
    uploads.check_content_length(request, limit)
    workdir = uploads.new_workdir(settings)
    try:
        if content_type == uploads.MULTIPART:
            path = await uploads.receive_multipart(request, workdir, limit)
            received = None
        else:
            path = workdir / "upload"
            received = await uploads.receive_body(request, path, limit)
            if received.size_bytes == 0:
                raise ApiError(400, "invalid_archive", "the request body is empty")
        result = await run_in_threadpool(store_source, request, path, name=name, received=received,
                                         base_model=repo)
    finally:
        await run_in_threadpool(uploads.remove, workdir)
    return JSONResponse(result, status_code=201, headers={"Location": f"/v1/sources/{result['id']}"})


@router.get("/{source_id}/lineage", dependencies=[requires("viewer")],
            summary="What was made from a source (downstream), any depth, with the recipe of every edge")
def source_lineage(source_id: str, request: Request, params: dict = Depends(lineage_params),
                   s: Session = Depends(get_session)):
    if catalog.get_source(s, source_id=source_id, organization_id=org_id(request)) is None:
        raise not_found("source", source_id)
    return catalog.lineage(s, source_id=source_id, organization_id=org_id(request), **params)


@router.post("/{source_id}/withdraw", summary="Withdraw a source and flag everything made from it",
             dependencies=[requires("maintainer")])
def withdraw_source(source_id: str, request: Request, body: WithdrawIn = Body(...),
                    s: Session = Depends(get_session)):
    """[role: maintainer] Withdraw a source with a reason: every artifact made from it (any depth) is
    flagged, hidden from default listings and refused for download, and no new job may use the
    source. Withdrawing again keeps the first reason."""
    mark_audit(request, "source.withdraw", "source", source_id)
    if catalog.get_source(s, source_id=source_id, organization_id=org_id(request)) is None:
        raise not_found("source", source_id)
    result = catalog.withdraw_source(s, source_id=source_id, reason=body.reason, actor=actor(request),
                                     request=request_info(request), organization_id=org_id(request))
    s.commit()
    return result


@router.post("/{source_id}/reinstate", dependencies=[requires("admin")],
             summary="Undo a source's withdrawal (and the flags it put on everything made from it)")
def reinstate_source(source_id: str, request: Request, body: ReinstateIn = Body(...),
                     s: Session = Depends(get_session)):
    """[role: admin] Undo the withdrawal of this source: it takes jobs again, and what was made from
    it is listed and downloadable again, except what still comes from another withdrawn node."""
    mark_audit(request, "source.reinstate", "source", source_id)
    if catalog.get_source(s, source_id=source_id, organization_id=org_id(request)) is None:
        raise not_found("source", source_id)
    result = catalog.reinstate(s, node_type="source", node_id=source_id, reason=body.reason, actor=actor(request),
                               request=request_info(request), organization_id=org_id(request))
    s.commit()
    return result


class FrontierSpeed(BaseModel):
    """How fast the artifact runs, on the worker that made it (its hardware class)."""

    pp_tokens_per_s: float | None = Field(None, description="GGUF: prompt processing (llama-bench pp512)")
    tg_tokens_per_s: float | None = Field(None, description="GGUF: generation (llama-bench tg128)")
    threads: int | None = None
    latency_ms_p50: float | None = Field(None, description="ONNX: latency at batch 1")
    throughput_seq_per_s: float | None = None
    hardware_class: str | None = None


class FrontierItem(BaseModel):
    artifact_id: str
    name: str = Field(..., description="the quantization, e.g. Q4_K_M")
    format: str
    size_bytes: int = Field(..., description="every file of the artifact (all shards)")
    bits_per_weight: float | None = None
    mean_kl: float | None = Field(None, description="quality report's mean KL vs the source (else the validation's)")
    ppl_ratio: float | None = Field(None, description="perplexity of the artifact / of the source")
    top1_agreement: float | None = None
    cosine_min: float | None = Field(None, description="ONNX encoders: worst cosine vs the source")
    speed: FrontierSpeed | None = None
    tensor_types: dict[str, str] | None = None
    created_at: str | None = None
    pareto: bool = Field(..., description="no other artifact listed is both no larger and no worse")


class Frontier(BaseModel):
    source_id: str
    loss: str
    items: list[FrontierItem]


@router.get("/{source_id}/frontier", dependencies=[requires("viewer")], response_model=Frontier,
            summary="Every artifact of a source with size, bits per weight, KL, PPL ratio and speed; "
                    "Pareto-optimal ones marked")
def source_frontier(source_id: str, request: Request,
                    loss: str = Query("mean_kl", pattern="^(mean_kl|ppl_ratio)$",
                                      description="the quality measure the Pareto flag ranks by"),
                    s: Session = Depends(get_session)) -> Frontier:
    if catalog.get_source(s, source_id=source_id, organization_id=org_id(request)) is None:
        raise not_found("source", source_id)
    rows = frontier.source_frontier(s, source_id=source_id, organization_id=org_id(request), loss=loss)
    return Frontier(source_id=source_id, loss=loss, items=[FrontierItem(**row) for row in rows])


@router.get("/{source_id}", summary="A source model's metadata", dependencies=[requires("viewer")])
def get_source(source_id: str, request: Request, s: Session = Depends(get_session)):
    source = catalog.get_source(s, source_id=source_id, organization_id=org_id(request))
    if source is None:
        raise not_found("source", source_id)
    return source_json(source)


# Keys the service writes itself: their objects belong to a tenant's source or artifact.
MANAGED_PREFIXES = ("sources/", "artifacts/")


def _may_read_key(request: Request, key: str) -> bool:
    """A key under the service's own prefixes is readable only when one of the caller's
    organisation's sources or artifacts is stored there (another tenant's upload is 'no object')."""
    if not key.startswith(MANAGED_PREFIXES):
        return True
    from sqlalchemy import exists, or_, select

    from quantyard.catalog.models import Artifact, Source

    org = org_id(request)
    with request.app.state.session_factory() as s:
        return bool(s.execute(select(or_(
            exists().where(Source.storage_key == key, Source.organization_id == org),
            exists().where(Artifact.storage_key == key, Artifact.organization_id == org),
        ))).scalar())


def register_uri_source(request: Request, uri: str) -> dict:
    """Register an object that already lives in this store as a source (used by POST /v1/jobs
    when ``source`` is a URI): it is downloaded to a temporary file, hashed and checked like an
    upload, and recorded pointing at its existing key. Runs in a worker thread."""
    from quantyard.storage import uri_to_key

    app = request.app
    store = app.state.store
    try:
        key = uri_to_key(store, uri)
    except ValueError:
        # The store's own URL (bucket, local path) is the operator's business, not the tenant's.
        raise ApiError(422, "invalid_source", f"{uri[:300]!r} is neither a source id nor a URI in this object "
                       "store", details={"field": "source"}) from None
    size = store.stat(key) if _may_read_key(request, key) else None
    if size is None:
        raise ApiError(404, "source_not_found", f"no object at {uri!r}")
    if size > app.state.settings.max_upload_bytes:
        raise ApiError(413, "payload_too_large", f"{uri!r} is larger than the limit of "
                       f"{app.state.settings.max_upload_bytes} bytes")
    workdir = uploads.new_workdir(app.state.settings)
    try:
        path = workdir / "object"
        store.download_file(key, path)
        return store_source(request, path, name=key.rstrip("/").rsplit("/", 1)[-1], uri=uri, storage_key=key)
    finally:
        uploads.remove(workdir)
