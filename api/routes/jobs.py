"""Jobs: submit, inspect, list, cancel."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from api.auth import requires
from api.deps import actor, get_session, mark_audit, org_id, principal, request_info
from api.errors import CATALOG_DOWN, ApiError, not_found
from api.responses import JSONResponse
from api.routes.sources import register_uri_source
from quantyard import catalog
from quantyard.engine.errors import UnsupportedTarget
from quantyard.engine.manifest import MANIFEST
from quantyard.engine.spec import parse_target

log = logging.getLogger("quantyard.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JOB_STATUSES = catalog.JOB_STATUSES
FINISHED = catalog.TERMINAL_JOB_STATUSES


# Caps on what a job carries: every listing echoes it (GET /v1/jobs?limit=50, polled by the
# dashboard every 2 s), so one job must stay small. The request body as a whole is capped by
# settings.max_json_body_bytes (api/middleware.py).
MAX_TARGETS = 32
MAX_LABELS = 64
MAX_LABEL_KEY = 100
MAX_LABEL_VALUE = 500
# Calibration text (GGUF imatrix: params.calibration_text; ONNX int8-static: params.calibration_texts
# or params.calibration) and a quality report's evaluation text (params.evaluation_text): UTF-8
# bytes of its JSON, per target; listings show their digests.
MAX_CALIBRATION_BYTES = 1 << 20
CALIBRATION_KEYS = ("calibration_text", "calibration_texts", "calibration", "evaluation_text")
# Every other parameter of a target together (its JSON), and how deep it may nest.
MAX_PARAMS_BYTES = 16 << 10
MAX_PARAMS_DEPTH = 8

LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_KEY, pattern=r"^[^=]+$")]
LabelValue = Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE)]
TargetText = Annotated[str, StringConstraints(min_length=1, max_length=120)]


class TargetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = Field(..., min_length=1, max_length=50)
    quantization: str = Field(..., min_length=1, max_length=50)
    params: dict[str, Any] = Field(default_factory=dict, description=(
        f"format options; calibration text (calibration_text, calibration_texts) up to "
        f"{MAX_CALIBRATION_BYTES} bytes, every other parameter together up to {MAX_PARAMS_BYTES} bytes of JSON"))


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(..., min_length=1, max_length=2048,
                        description="A source id (src_...) or the URI of an archive in this object store")
    targets: list[TargetText | TargetIn] = Field(
        ..., min_length=1, max_length=MAX_TARGETS,
        description='e.g. ["gguf:Q8_0"] or [{"format": "gguf", "quantization": "Q8_0", "params": {}}]')
    hardware_class: str = Field("cpu", min_length=1, max_length=50)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS,
                                               description="key=value tags (keys without '=')")


def _json_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode())


def _depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests (stops counting past ``limit``)."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in children), default=0)


def check_params(i: int, params: dict[str, Any]) -> None:
    """422 naming ``targets[i].params...`` when a target's parameters are too large or too deep."""
    if _depth(params, MAX_PARAMS_DEPTH) > MAX_PARAMS_DEPTH:
        raise ApiError(422, "validation_error", f"targets[{i}].params: nested deeper than {MAX_PARAMS_DEPTH} levels",
                       details={"field": f"targets[{i}].params"})
    for key in CALIBRATION_KEYS:
        if key in params and _json_size(params[key]) > MAX_CALIBRATION_BYTES:
            raise ApiError(422, "validation_error", f"targets[{i}].params.{key}: longer than the limit of "
                           f"{MAX_CALIBRATION_BYTES} bytes", details={"field": f"targets[{i}].params.{key}",
                                                                     "limit_bytes": MAX_CALIBRATION_BYTES})
    rest = {k: v for k, v in params.items() if k not in CALIBRATION_KEYS}
    if _json_size(rest) > MAX_PARAMS_BYTES:
        raise ApiError(422, "validation_error", f"targets[{i}].params: the parameters (calibration text aside) "
                       f"are larger than {MAX_PARAMS_BYTES} bytes of JSON",
                       details={"field": f"targets[{i}].params", "limit_bytes": MAX_PARAMS_BYTES})


def _valid_targets_text() -> str:
    return "; ".join(f"{fmt}: {', '.join(spec['quantizations'])}" for fmt, spec in MANIFEST["formats"].items())


def parse_targets(raw: list) -> list[dict]:
    if not raw:
        raise ApiError(422, "validation_error", f"targets must not be empty; valid targets: {_valid_targets_text()}")
    specs = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        value = item.model_dump() if isinstance(item, TargetIn) else item
        if isinstance(item, TargetIn):
            check_params(i, item.params)
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
    """A program source (torch.export, TorchScript, .onnx) has no config.json: ONNX targets only.
    A GGUF file is requantized: GGUF targets only (an ONNX export needs the Hugging Face folder)."""
    meta = (source.meta or {}) if source is not None else {}  # a Source or catalog.SourceFacts
    if meta.get("format") == "gguf":
        for i, t in enumerate(targets):
            if t["format"] != "gguf":
                raise ApiError(422, "unsupported_target",
                               f"targets[{i}]: {t['format']}:{t['quantization']} — this source is a GGUF file, which "
                               "is requantized to gguf targets only; upload the Hugging Face folder (config.json + "
                               f"weights) for {t['format']} targets",
                               details={"field": f"targets[{i}]", "source_kind": "gguf", "valid_formats": ["gguf"]})
        return
    if meta.get("format") != "program":
        return
    for i, t in enumerate(targets):
        if t["format"] != "onnx":
            raise ApiError(422, "unsupported_target",
                           f"targets[{i}]: {t['format']}:{t['quantization']} — {t['format']} needs a Hugging Face "
                           f"folder (config.json + weights); this source is a {meta.get('source_kind')} program "
                           f"({meta.get('model_file')}), which converts to onnx targets only",
                           details={"field": f"targets[{i}]", "source_kind": meta.get("source_kind"),
                                    "valid_formats": ["onnx"]})


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
        # Busy means tasks under a live lease (prepare stages and targets), not jobs whose status
        # says running: a job whose worker died or whose message was lost keeps nobody busy.
        slots = catalog.reconcile.slots(self.s, hardware_class=hc, stale_after_s=self.stale_after_s)
        if not slots.live_workers:
            return f"no live worker serves hardware class {hc!r}"
        if slots.free <= 0:
            depth = catalog.queue_depth(self.s).get(hc, 0)
            return (f"all {slots.live_workers} live worker(s) for hardware class {hc!r} are busy "
                    f"({slots.busy} task(s) running); {depth} job(s) queued for this class")
        return None


def worker_capacity(workers) -> int:
    """Tasks the given workers can run at once (a worker may advertise "concurrency")."""
    return catalog.reconcile.worker_capacity(workers)


def busy_workers(s: Session, hc: str) -> int:
    """Tasks a worker of the given hardware class is on now (under a live lease)."""
    return catalog.reconcile.busy_slots(s, hardware_class=hc)


def job_json(job, reasons: WaitingReasons | None = None, *, brief: bool = False) -> dict:
    """A job as the API shows it; ``brief`` (listings): calibration text as its sha256 and size."""
    data = job.to_dict()
    if brief:
        for target in data["targets"]:
            target["params"] = brief_params(target["params"])
    if reasons is not None:
        reason = reasons(data)
        if reason:
            data["waiting_reason"] = reason
    return data


def brief_params(params: dict) -> dict:
    """``params`` with each calibration value replaced by ``{"sha256", "bytes"}`` (of the text's UTF-8,
    as lineage recipes identify it; of the JSON for a list or object): a listing of 50 jobs stays
    small however long their texts are. GET /v1/jobs/{id} shows them whole."""
    out = dict(params)
    for key in CALIBRATION_KEYS:
        if key in out:
            value = out[key]
            raw = value.encode() if isinstance(value, str) else \
                json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode()
            out[key] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw), "omitted": True}
    return out


def resolve_source(request: Request, s: Session, ref: str):
    """A source id, or a URI of this store (registered as a source on the fly); returns the source."""
    source_id = ref if "://" not in ref else register_uri_source(request, ref)["id"]
    source = catalog.get_source(s, source_id=source_id, organization_id=org_id(request))
    if source is None:
        raise not_found("source", ref)
    return source


SOURCE_FACTS_MAX = 4096


def submission_source(request: Request, s: Session, ref: str, *, remembered: bool = True) -> catalog.SourceFacts:
    """The facts of the source a submission names. A source id this process resolved before is
    answered from memory (they never change; that it still exists and is not withdrawn is
    checked by the job's INSERT, see catalog.create_job); otherwise it is read, and must exist in
    the caller's organisation (404) and not be withdrawn (422)."""
    cache = getattr(request.app.state, "source_facts", None)
    if cache is None:
        cache = request.app.state.source_facts = {}
    key = (org_id(request), ref)
    if remembered and "://" not in ref and key in cache:
        return cache[key]
    source = resolve_source(request, s, ref)
    check_source_not_withdrawn(s, source.id)
    facts = catalog.SourceFacts.of(source)
    if "://" not in ref:
        if len(cache) >= SOURCE_FACTS_MAX:  # many sources: start over rather than grow
            cache.clear()
        cache[key] = facts
    return facts


@router.post("", status_code=202, summary="Submit a conversion job", dependencies=[requires("submitter")])
def create_job(body: JobCreate, request: Request, s: Session = Depends(get_session)):
    mark_audit(request, "job.create", "job")
    hardware_class = check_hardware_class(body.hardware_class)
    targets = parse_targets(body.targets)
    check_labels(body.labels)
    source = submission_source(request, s, body.source)
    check_targets_fit_source(source, targets)

    def create(facts: catalog.SourceFacts):
        return catalog.create_job(s, source_id=facts.id, targets=targets, hardware_class=hardware_class,
                                  labels=dict(body.labels), actor=actor(request), request=request_info(request),
                                  source=facts)

    try:
        job = create(source)
    except catalog.SourceChanged:  # deleted or withdrawn since this process remembered it: read it again
        s.rollback()
        request.app.state.source_facts.pop((org_id(request), body.source), None)
        job = create(submission_source(request, s, body.source, remembered=False))
    s.commit()
    job_id = job.id
    try:
        request.app.state.dispatcher.send(job_id=job_id, hardware_class=hardware_class)
    except Exception as exc:
        # The exception names the broker's host (and maybe credentials): the log gets it, not the tenant.
        log.error("could not enqueue job %s: %s: %s", job_id, type(exc).__name__, exc)
        catalog.finish_job(s, job_id=job_id, status="failed", error_code="broker_unavailable",
                           error_message="the job queue was unreachable when the job was submitted")
        s.commit()
        raise ApiError(503, "broker_unavailable", f"job {job_id} was recorded but could not be queued "
                       "(the job queue is unreachable); it is marked failed, submit it again later",
                       details={"job_id": job_id}, headers={"Retry-After": "5"}) from None
    log.info("job %s queued for %s", job_id, hardware_class, extra={"job_id": job_id})  # its first log line
    # The job as committed (nothing read back: the session keeps what it wrote); the waiting
    # reason of its hardware class is at most a second old (per process).
    data = job_json(job, recent_waiting_reasons(request, s))
    return JSONResponse(data, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


WAITING_REASON_TTL_S = 1.0


class RecentReasons:
    """The waiting reason per hardware class, remembered for WAITING_REASON_TTL_S. When it is due,
    one request asks the catalog; requests meanwhile take the previous answer (it is about the
    workers, informational, and only a moment older) instead of all asking at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, tuple[float, str | None]] = {}

    def get(self, hc: str, compute) -> str | None:
        hit = self._values.get(hc)
        if hit is not None and time.monotonic() - hit[0] <= WAITING_REASON_TTL_S:
            return hit[1]
        if hit is not None and not self._lock.acquire(blocking=False):
            return hit[1]  # another request is asking the catalog
        if hit is None:
            self._lock.acquire()
        try:
            hit = self._values.get(hc)
            if hit is None or time.monotonic() - hit[0] > WAITING_REASON_TTL_S:
                hit = self._values[hc] = (time.monotonic(), compute())
            return hit[1]
        finally:
            self._lock.release()


def recent_waiting_reasons(request: Request, s: Session):
    """WaitingReasons for a submission, remembered per hardware class in this process
    (RecentReasons): a burst of submissions does not ask the catalog about the workers each
    time. GET /v1/jobs/{id} always computes it afresh."""
    state = request.app.state
    recent = getattr(state, "submit_waiting_reasons", None)
    if recent is None:
        recent = state.submit_waiting_reasons = RecentReasons()
    fresh = WaitingReasons(s, state.settings.worker_stale_after_s)

    def reason(job: dict) -> str | None:
        if job.get("status") != "queued":
            return None
        return recent.get(job.get("hardware_class") or "cpu", lambda: fresh(job))

    return reason


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
    except (OverflowError, sa_exc.StatementError) as exc:
        if cursor is None or isinstance(exc, CATALOG_DOWN):
            raise
        # A cursor whose time is past year 1-9999 in UTC: it decodes, but no page starts there.
        raise ApiError(400, "invalid_cursor", "invalid cursor: its time is out of range",
                       details={"parameter": "cursor"}) from None
    reasons = WaitingReasons(s, request.app.state.settings.worker_stale_after_s)
    return {"items": [job_json(j, reasons, brief=True) for j in jobs], "next_cursor": next_cursor}


@router.get("/{job_id}", summary="A job's status, progress, targets, artifacts and error",
            dependencies=[requires("viewer")])
def get_job(job_id: str, request: Request, s: Session = Depends(get_session)):
    job = catalog.get_job(s, job_id=job_id, organization_id=org_id(request))
    if job is None:
        raise not_found("job", job_id)
    return job_json(job, WaitingReasons(s, request.app.state.settings.worker_stale_after_s))


@router.post("/{job_id}/cancel", summary="Cancel a job (cooperative for running jobs)",
             dependencies=[requires("submitter")],
             responses={200: {"description": "the job is cancelled"},
                        202: {"description": "cancel requested: the worker running it stops at its next step"}})
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
    # Ends at once whatever no live worker holds (catalog.request_cancel); a worker that holds a
    # part stops at its next step, and an artifact it uploads meanwhile is not recorded.
    job = catalog.request_cancel(s, job_id=job_id, actor=actor(request), request=request_info(request),
                                 organization_id=org_id(request))
    s.commit()
    s.refresh(job)
    if job.status in FINISHED and job.status != "cancelled":  # finished while we were asking
        raise ApiError(409, "job_finished", f"job {job_id} is already {job.status}: too late to cancel "
                       "(it was finishing)", details={"status": job.status})
    data = job_json(job)
    return JSONResponse(data, status_code=200 if data.get("status") == "cancelled" else 202)
