"""GET /v1/audit: the audit trail as JSON lines for a time range (admins only).

Each line is one event with every hashed field, ``prev_hash`` and ``hash``, oldest first. The
chain runs through every organisation's events, so only the operator (an admin of the default
organisation) gets the whole chain, which re-verifies on its own (``quantyard audit verify
--file``); an admin of another organisation gets its organisation's events only (``X-Audit-Scope:
organization``): each still matches its own hash, but they do not link up. The range covers every seq from
the first event at or after ``since`` to the last one before ``until`` (see
``quantyard.catalog.audit.seq_range``): an export is one unbroken piece of the chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api.auth import is_operator, requires
from api.deps import principal
from api.errors import ApiError, out_of_range
from quantyard.catalog.audit import iter_export

router = APIRouter(prefix="/v1/audit", tags=["audit"])

FORMATS = {"jsonl": "application/jsonl"}
TIME = {"format": "date-time"}  # ISO 8601 query parameters, as the schema shows them


def _utc(name: str, value: str | None) -> datetime | None:
    """An ISO 8601 time (not a number: pydantic would read "2.0" as a Unix time) in UTC."""
    if value is None or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ApiError(422, "validation_error", f"{name} must be an ISO 8601 time (e.g. 2026-01-31T12:00:00Z), "
                       f"got {value[:40]!r}", details={"parameter": name}) from None
    try:
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise out_of_range(name, value, "years 1-9999 in UTC") from None


@router.get("", summary="Export the audit trail as JSON lines for a time range",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/jsonl": {}}, "description": "one event per line"}},
            dependencies=[requires("admin")])
def export_audit(request: Request,
                 since: Annotated[str | None, Query(min_length=1, max_length=40, json_schema_extra=TIME,
                                                    description="ISO 8601; naive means UTC; inclusive")] = None,
                 until: Annotated[str | None, Query(min_length=1, max_length=40, json_schema_extra=TIME,
                                                    description="ISO 8601; naive means UTC; exclusive")] = None,
                 format: Annotated[str, Query(description="jsonl (the only format)")] = "jsonl"):
    if format not in FORMATS:
        raise ApiError(422, "validation_error", f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    since, until = _utc("since", since), _utc("until", until)
    if since is not None and until is not None and since >= until:
        raise ApiError(422, "validation_error", "since must be earlier than until")
    factory = request.app.state.session_factory
    caller = principal(request)
    scope = None if is_operator(caller) else caller.organization_id

    def lines() -> Iterator[bytes]:
        # Its own session: the response streams after the route (and its dependencies) returned.
        with factory() as s:
            for line in iter_export(s, since=since, until=until, organization_id=scope):
                yield line.encode()

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(lines(), media_type=FORMATS[format], headers={
        "Content-Disposition": f'attachment; filename="quantyard-audit-{stamp}.jsonl"',
        "X-Audit-Scope": "chain" if scope is None else "organization"})
