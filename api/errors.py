"""Every error the API returns is JSON ``{"error": {"code", "message"}}`` with a fitting status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.responses import JSONResponse
from quantyard.archive import InvalidArchive, UnsafeArchive
from quantyard.catalog.audit import AuditUnavailable
from quantyard.catalog.errors import CatalogError, InvalidArgument, InvalidCursor, InvalidState, NotFound
from quantyard.engine.errors import ConversionError

log = logging.getLogger("quantyard.api")


class ApiError(Exception):
    """Raise from a route to answer ``status`` with ``{"error": {"code", "message", ...}}``."""

    def __init__(self, status: int, code: str, message: str, *, details: dict | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, f"{kind}_not_found", f"no {kind} with id {ident!r}")


def out_of_range(parameter: str, value: object, expected: str) -> ApiError:
    """422 naming a query parameter whose value parses but cannot be used (e.g. a time whose UTC
    conversion leaves years 1-9999)."""
    return ApiError(422, "validation_error", f"{parameter}: {str(value)[:60]!r} is out of range ({expected})",
                    details={"parameter": parameter})


# Status for each engine error code; anything else a ConversionError says is a 400.
CONVERSION_STATUS: dict[str, int] = {
    "invalid_model": 400,
    "unsupported_architecture": 422,
    "unsupported_target": 422,
    "validation_failed": 422,
    "cancelled": 409,
    "resource_exhausted": 503,
    "storage_unavailable": 503,  # quantyard.storage.StorageUnavailable: S3 down past its retries
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "service_unavailable",
}


# ---------------------------------------------------------------- the error body, as documented


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str = Field(..., description="a stable, machine-readable code (e.g. source_not_found)")
    message: str = Field(..., description="what went wrong, naming the parameter, field or file")
    details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the API."""

    model_config = ConfigDict(extra="allow")
    error: ErrorInfo


_DESCRIPTIONS = {
    400: "Bad request (a malformed body, cursor or file)",
    401: "No valid API key",
    403: "The key's role is not enough",
    404: "No such resource (or it is another organisation's)",
    405: "Method not allowed",
    409: "Conflicts with the resource's state",
    410: "Gone (withdrawn, deleted or purged)",
    413: "The request body is too large",
    415: "Unsupported media type",
    422: "A parameter or field is invalid (the message names it)",
    503: "A backing service (catalog, queue, store) is unavailable; retry after Retry-After seconds",
}
# Documented on every operation (api/app.py), so generated clients and schema testers know them.
COMMON_ERRORS = (400, 401, 403, 404, 409, 413, 422, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI ``responses=`` mapping: each status answers :class:`ErrorBody`."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


# ---------------------------------------------------------------- answers


def error_body(code: str, message: str, details: dict | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        err["details"] = details
    return {"error": err}


def error_response(status: int, code: str, message: str, *, details: dict | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _loc(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header") and len(parts) > 1:
        return f"{parts[0]}.{'.'.join(parts[1:])}" if parts[0] != "body" else ".".join(parts[1:])
    return ".".join(parts) or "request"


def _validation_message(exc: RequestValidationError) -> tuple[str, list[dict]]:
    fields = []
    msgs = []
    for e in exc.errors():
        where = _loc(e.get("loc", ()))
        msg = e.get("msg", "invalid")
        fields.append({"field": where, "message": msg, "type": e.get("type")})
        msgs.append(f"{where}: {msg}")
    return ("; ".join(msgs) or "invalid request"), fields


def _audit_failure(request: Request, status: int, code: str) -> None:
    """Best effort: a refused mutating request leaves an audit event with outcome 'failure'."""
    action = getattr(request.state, "audit_action", None)
    if not action:
        return
    from api.deps import record_failure  # local: avoids an import cycle

    record_failure(request, action, status=status, code=code)


# The catalog's connection failed, timed out or the pool is exhausted: retryable, so 503.
# (sqlalchemy wraps every DB-API OperationalError/InterfaceError, e.g. psycopg's
# QueryCanceled for statement_timeout and LockNotAvailable for lock_timeout.)
CATALOG_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)
RETRY_AFTER_S = 5


def catalog_unavailable() -> JSONResponse:
    return error_response(503, "catalog_unavailable", "the catalog database is unavailable; retry later",
                          headers={"Retry-After": str(RETRY_AFTER_S)})


def install_error_handlers(app: FastAPI) -> None:
    install_outage_handlers(app)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        _audit_failure(request, exc.status, exc.code)
        return error_response(exc.status, exc.code, exc.message, details=exc.details, headers=exc.headers)

    @app.exception_handler(UnsafeArchive)
    async def _unsafe(request: Request, exc: UnsafeArchive):
        _audit_failure(request, 400, "unsafe_archive")
        details = {"member": exc.member} if exc.member is not None else None
        return error_response(400, "unsafe_archive", str(exc), details=details)

    @app.exception_handler(InvalidArchive)
    async def _invalid_archive(request: Request, exc: InvalidArchive):
        _audit_failure(request, 400, "invalid_archive")
        return error_response(400, "invalid_archive", str(exc))

    @app.exception_handler(ConversionError)
    async def _conversion(request: Request, exc: ConversionError):
        status = CONVERSION_STATUS.get(exc.code, 400)
        _audit_failure(request, status, exc.code)
        return error_response(status, exc.code, exc.message, details=exc.details or None)

    @app.exception_handler(CatalogError)
    async def _catalog(request: Request, exc: CatalogError):
        if isinstance(exc, NotFound):
            status = 404
        elif isinstance(exc, InvalidState):
            status = 409
        elif isinstance(exc, InvalidCursor):
            status = 400
        elif isinstance(exc, InvalidArgument):
            status = 422
        elif isinstance(exc, AuditUnavailable):  # fail closed: no change without its audit record
            status = 503
        else:
            log.error("catalog error on %s %s: %s", request.method, request.url.path, exc)
            status = 500
        code = exc.code if status != 500 else "internal_error"
        message = str(exc) if status != 500 else "internal server error"
        _audit_failure(request, status, code)
        return error_response(status, code, message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, fields = _validation_message(exc)
        _audit_failure(request, 422, "validation_error")
        return error_response(422, "validation_error", message, details={"fields": fields})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route for {request.method} {request.url.path}"
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(OverflowError)
    async def _overflow(request: Request, exc: OverflowError):
        # A number or time the routes' checks let through but the catalog cannot represent.
        log.warning("overflow on %s %s: %s", request.method, request.url.path, exc)
        return error_response(422, "out_of_range", "a parameter is out of the range the catalog can store")

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):  # pragma: no cover - see middleware
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")


def install_outage_handlers(app: FastAPI) -> None:
    """Database outages are 503 ``catalog_unavailable`` with Retry-After, never library text
    (a connection error names hosts and users: that goes to the log)."""

    async def _down(request: Request, exc: Exception):
        log.warning("catalog unavailable on %s %s: %s: %s", request.method, request.url.path,
                    type(exc).__name__, exc)
        return catalog_unavailable()  # no failure audit event: it would wait on the same database

    for cls in CATALOG_DOWN:
        app.add_exception_handler(cls, _down)

    @app.exception_handler(sa_exc.DataError)
    async def _data(request: Request, exc: sa_exc.DataError):
        # The database refused a value (e.g. a number past bigint): the caller's input, not a bug.
        log.warning("catalog refused a value on %s %s: %s", request.method, request.url.path, exc)
        return error_response(422, "out_of_range", "a parameter is out of the range the catalog can store")

    @app.exception_handler(sa_exc.StatementError)
    async def _statement(request: Request, exc: sa_exc.StatementError):
        # A bound value that could not be converted (OverflowError from a time or integer).
        if isinstance(exc.orig, (OverflowError, ValueError)):
            log.warning("unbindable value on %s %s: %s", request.method, request.url.path, exc.orig)
            return error_response(422, "out_of_range", "a parameter is out of the range the catalog can store")
        log.error("catalog statement error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal server error")
