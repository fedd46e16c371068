"""Jobs: submit, inspect, list, cancel."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from quantyard import catalog
from quantyard.engine.errors import UnsupportedTarget
from quantyard.engine.manifest import MANIFEST
from quantyard.engine.spec import parse_target
from quantyard.queue import enqueue_job

from api import stats
from api.auth import requires
from api.deps import actor, get_session, mark_audit, org_id, principal, request_info
from api.errors import ApiError, not_found
from api.routes.sources import register_uri_source

log = logging.getLogger("quantyard.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JOB_STATUSES = catalog.JOB_STATUSES
FINISHED = catalog.TERMINAL_JOB_STATUSES


class TargetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    quantization: str
    params: dict[str, Any] = Field(default_factory=dict)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(..., min_length=1, max_length=2048,
                        description="A source id (src_...) or the URI of an archive in this object store")
    targets: list[str | TargetIn] = Field(..., description='e.g. ["gguf:Q8_0"] or [{"format": "gguf", '
                                          '"quantization": "Q8_0", "params": {}}]')
    hardware_class: str = "cpu"
    labels: dict[str, str] = Field(default_factory=dict)


def _valid_targets_text() -> str:
    return "; ".join(f"{fmt}: {', '.join(spec['quantizations'])}" for fmt, spec in MANIFEST["formats"].items())


def parse_targets(raw: list) -> list[dict]:
    if not raw:
        raise ApiError(422, "validation_error", f"targets must not be empty; valid targets: {_valid_targets_text()}")
    specs = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        value = item.model_dump() if isinstance(item, TargetIn) else item
        try:
            spec = parse_target(value)
        except UnsupportedTarget as exc:
            raise ApiError(422, "unsupported_target", f"targets[{i}]: {exc.message}",
                           details={"valid": {f: s["quantizations"] for f, s in MANIFEST["formats"].items()}}) from None
        if spec in seen:
            raise ApiError(422, "duplicate_target", f"targets[{i}]: {spec.key} is listed more than once")
        seen.add(spec)
        specs.append(spec.to_dict())
    return specs


def check_targets_fit_source(source, targets: list[dict]) -> None:
    """A program source (torch.export, TorchScript, .onnx) has no config.json: ONNX targets only."""
    meta = (source.meta or {}) if source is not None else {}
    if meta.get("format") != "program":
        return
    for i, t in enumerate(targets):
        if t["format"] != "onnx":
            raise ApiError(422, "unsupported_target",
                           f"targets[{i}]: {t['format']}:{t['quantization']} — {t['format']} needs a Hugging Face "
                           f"folder (config.json + weights); this source is a {meta.get('source_kind')} program "
                           f"({meta.get('model_file')}), which converts to onnx targets only",
                           details={"source_kind": meta.get("source_kind"), "valid_formats": ["onnx"]})


def check_source_not_withdrawn(s: Session, source_id: str) -> None:
    """No new conversions of a withdrawn source: 422 naming the withdrawal."""
    try:
        catalog.check_not_withdrawn(s, source_id=source_id)
    except catalog.Withdrawn as exc:
        raise ApiError(422, "source_withdrawn", str(exc), details={"source_id": source_id,
                                                                    "withdrawal": exc.withdrawal}) from None


def check_hardware_class(value: str) -> str:
    valid = MANIFEST["hardware_classes"]
    if value not in valid:
        raise ApiError(422, "unsupported_hardware_class",
                       f"unknown hardware class {value!r}; valid hardware classes: {', '.join(valid)}",
                       details={"valid": list(valid)})
    return value


def check_labels(labels: dict[str, str]) -> None:
    for k, v in labels.items():
        if not k or len(k) > 100 or "=" in k:
            raise ApiError(422, "validation_error", f"labels: invalid key {k!r} (1-100 characters, no '=')")
        if len(v) > 500:
            raise ApiError(422, "validation_error", f"labels.{k}: value longer than 500 characters")


class WaitingReasons:
    """Explains why a queued job is not running yet; caches per hardware class in one request."""

    def __init__(self, s: Session, stale_after_s: float):
        self.s = s
        self.stale_after_s = stale_after_s
        self._cache: dict[str, str | None] = {}

    def __call__(self, job: dict) -> str | None:
        if job.get("status") != "queued":
            return None
        hc = job.get("hardware_class") or "cpu"
        if hc not in self._cache:
            self._cache[hc] = self._reason(hc)
        return self._cache[hc]

    def _reason(self, hc: str) -> str | None:
        workers = catalog.live_workers(self.s, hardware_class=hc, stale_after_s=self.stale_after_s)
        if not workers:
            return f"no live worker serves hardware class {hc!r}"
        depth = catalog.queue_depth(self.s).get(hc, 0)
        busy = busy_workers(self.s, hc)
        if busy >= worker_capacity(workers):
            return (f"all {len(workers)} live worker(s) for hardware class {hc!r} are busy; "
                    f"{depth} job(s) queued for this class")
        return None


def worker_capacity(workers) -> int:
    """Jobs the given workers can run at once (a worker may advertise "concurrency")."""
    total = 0
    for w in workers:
        caps = getattr(w, "capabilities", None) or {}
        try:
            total += max(int(caps.get("concurrency", 1)), 1)
        except (TypeError, ValueError):
            total += 1
    return total


def busy_workers(s: Session, hc: str) -> int:
    """Jobs currently running on the given hardware class."""
    return stats.running_by_hardware_class(s, hc).get(hc, 0)


def job_json(job, reasons: WaitingReasons | None = None) -> dict:
    data = job.to_dict()
    if reasons is not None:
        reason = reasons(data)
        if reason:
            data["waiting_reason"] = reason
    return data


def resolve_source(request: Request, s: Session, ref: str) -> str:
    """A source id, or a URI of this store (registered as a source on the fly); returns the id."""
    if "://" not in ref:
        source = catalog.get_source(s, source_id=ref, organization_id=org_id(request))
        if source is None:
            raise not_found("source", ref)
        return source.id
    return register_uri_source(request, ref)["id"]


@router.post("", status_code=202, summary="Submit a conversion job", dependencies=[requires("submitter")])
def create_job(body: JobCreate, request: Request, s: Session = Depends(get_session)):
    mark_audit(request, "job.create", "job")
    settings = request.app.state.settings
    hardware_class = check_hardware_class(body.hardware_class)
    targets = parse_targets(body.targets)
    check_labels(body.labels)
    source_id = resolve_source(request, s, body.source)
    check_targets_fit_source(catalog.get_source(s, source_id=source_id, organization_id=org_id(request)), targets)
    check_source_not_withdrawn(s, source_id)
    job = catalog.create_job(s, source_id=source_id, targets=targets, hardware_class=hardware_class,
                             labels=dict(body.labels), actor=actor(request), request=request_info(request))
    s.commit()
    job_id = job.id
    try:
        enqueue_job(request.app.state.celery, job_id=job_id, hardware_class=hardware_class)
    except Exception as exc:
        log.error("could not enqueue job %s: %s", job_id, exc)
        catalog.finish_job(s, job_id=job_id, status="failed", error_code="broker_unavailable",
                           error_message=f"the job queue is unreachable: {exc}")
        s.commit()
        raise ApiError(503, "broker_unavailable", f"job {job_id} was recorded but could not be queued "
                       f"(the broker is unreachable); it is marked failed: {exc}",
                       details={"job_id": job_id}) from None
    s.refresh(job)
    data = job_json(job, WaitingReasons(s, settings.worker_stale_after_s))
    return JSONResponse(data, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get("", summary="List jobs (newest first)", dependencies=[requires("viewer")])
def list_jobs(request: Request, status: str | None = Query(None), label: str | None = Query(None),
              limit: int = Query(50, ge=1, le=500), cursor: str | None = Query(None),
              s: Session = Depends(get_session)):
    if status is not None and status not in JOB_STATUSES:
        raise ApiError(422, "validation_error", f"status must be one of {', '.join(JOB_STATUSES)}")
    if label is not None and ("=" not in label or not label.split("=", 1)[0]):
        raise ApiError(422, "validation_error", "label must be of the form key=value")
    try:
        jobs, next_cursor = catalog.list_jobs(s, status=status, label=label, limit=limit, cursor=cursor,
                                              organization_id=org_id(request))
    except ValueError as exc:
        raise ApiError(400, "invalid_cursor", f"invalid cursor: {exc}") from None
    reasons = WaitingReasons(s, request.app.state.settings.worker_stale_after_s)
    return {"items": [job_json(j, reasons) for j in jobs], "next_cursor": next_cursor}


@router.get("/{job_id}", summary="A job's status, progress, targets, artifacts and error",
            dependencies=[requires("viewer")])
def get_job(job_id: str, request: Request, s: Session = Depends(get_session)):
    job = catalog.get_job(s, job_id=job_id, organization_id=org_id(request))
    if job is None:
        raise not_found("job", job_id)
    return job_json(job, WaitingReasons(s, request.app.state.settings.worker_stale_after_s))


@router.post("/{job_id}/cancel", summary="Cancel a job (cooperative for running jobs)",
             dependencies=[requires("submitter")])
def cancel_job(job_id: str, request: Request, s: Session = Depends(get_session)):
    """A submitter cancels its own jobs (same principal name); maintainers and admins any job of
    their organisation."""
    mark_audit(request, "job.cancel", "job", job_id)
    job = catalog.get_job(s, job_id=job_id, organization_id=org_id(request))
    if job is None:
        raise not_found("job", job_id)
    caller = principal(request)
    if not caller.has_role("maintainer") and job.created_by != caller.name:
        raise ApiError(403, "forbidden", f"job {job_id} was submitted by {job.created_by}; a submitter cancels "
                       "its own jobs only (maintainers cancel any)",
                       details={"required_role": "maintainer", "role": caller.role})
    if job.status in FINISHED:
        raise ApiError(409, "job_finished", f"job {job_id} is already {job.status}")
    job = catalog.request_cancel(s, job_id=job_id, actor=actor(request), request=request_info(request),
                                 organization_id=org_id(request))
    s.commit()
    s.refresh(job)
    if job.status in FINISHED and job.status != "cancelled":  # finished while we were asking
        raise ApiError(409, "job_finished", f"job {job_id} is already {job.status}")
    data = job_json(job)
    return JSONResponse(data, status_code=200 if data.get("status") == "cancelled" else 202)
