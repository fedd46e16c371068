"""Pure ASGI middleware: request ids (X-Request-ID in and out) and the last-resort 500 handler,
request body caps, security headers."""

from __future__ import annotations

import json
import logging
import re
import uuid

from fastapi import HTTPException  # FastAPI lets its own HTTPException out of a body read

from quantyard.logs import log_context

log = logging.getLogger("quantyard.api")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestIdMiddleware:
    """Take X-Request-ID from the request (when sane) or make one, store it in
    ``request.state.request_id`` and echo it in every response, including 500s.

    Unhandled exceptions are answered here with ``{"error": {"code": "internal_error"}}`` and
    logged with their traceback; the body never carries the trace.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = None
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                incoming = value.decode("latin-1").strip()
                break
        request_id = incoming if incoming and _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        # Every line logged while this request runs carries its id (quantyard/logs.py).
        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                log.exception("unhandled error on %s %s (request %s)", scope.get("method"), scope.get("path"), request_id)
                if started:
                    raise
                body = json.dumps({"error": {"code": "internal_error",
                                             "message": f"internal server error (request id {request_id})"}}).encode()
                await send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]})
                await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised by the capped ``receive``: the error handlers answer it as 413 payload_too_large."""

    def __init__(self, message: str):
        super().__init__(413, message)


class BodyLimitMiddleware:
    """Caps request bodies at ``limit`` bytes (413 ``payload_too_large``), except the routes
    ``exempt`` names (the source upload streams archives to disk under its own cap).

    A declared Content-Length over the cap is refused before the app runs; a chunked body is
    counted as it is read, and the read that crosses the cap raises the 413 (FastAPI lets an
    HTTPException from the body read through to the error handlers)."""

    def __init__(self, app, *, limit: int, exempt: frozenset[tuple[str, str]] = frozenset()):
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope.get("method"), scope.get("path")) in self.exempt:
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            return await _send_json(send, 413, "payload_too_large", self._message())
        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self._message())
            return message

        await self.app(scope, capped_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than the limit of {self.limit} bytes"


def _content_length(scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


async def _send_json(send, status: int, code: str, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class SecurityHeadersMiddleware:
    """Security headers on every response (errors and 500s included): nosniff, no framing, no
    referrer, and a Content-Security-Policy. JSON answers get ``default-src 'none'`` and
    ``Cache-Control: no-store`` (they hold tenants' data); the HTML pages (dashboard, /docs)
    run only scripts and styles served by this server."""

    COMMON = (
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
        (b"cross-origin-opener-policy", b"same-origin"),
    )
    API_CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    PAGE_CSP = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                b"frame-ancestors 'none'")
    # Swagger UI sets a few style attributes while it renders; scripts stay 'self' only.
    DOCS_CSP = PAGE_CSP.replace(b"style-src 'self'", b"style-src 'self' 'unsafe-inline'")
    NO_STORE_PREFIXES = ("/v1/", "/openapi.json", "/metrics")

    def __init__(self, app):
        self.app = app
        self.pages = {"/": self.PAGE_CSP, "/docs": self.DOCS_CSP}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        csp = self.pages.get(path) or (self.PAGE_CSP if path.startswith("/static/") else self.API_CSP)
        no_store = path.startswith(self.NO_STORE_PREFIXES) or path == "/v1"

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                ours = {k for k, _ in self.COMMON} | {b"content-security-policy"}
                if no_store:
                    ours.add(b"cache-control")
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in ours]
                headers += self.COMMON
                headers.append((b"content-security-policy", csp))
                if no_store:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
