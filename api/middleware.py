"""Pure ASGI middleware: request ids (X-Request-ID in and out) and the last-resort 500 handler."""

from __future__ import annotations

import json
import logging
import re
import uuid

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
