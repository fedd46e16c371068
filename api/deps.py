"""Request-scoped helpers: catalog sessions, the object store, request identity for audit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from quantyard import catalog

log = logging.getLogger("quantyard.api")

# The actor of a request that never reached authentication (e.g. a refused upload's audit event).
ANONYMOUS = "anonymous"


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One catalog session per request; rolled back if the route did not commit.

    Async: making a session does no I/O, and neither does closing one that holds no connection
    (the route committed); only a rollback or a close that returns a connection goes to the
    threadpool, so a request does not pay two threadpool trips for its session."""
    session = request.app.state.session_factory()
    try:
        yield session
    except BaseException:
        await run_in_threadpool(session.rollback)
        raise
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


def actor(request: Request) -> str:
    """The audit actor: the name of the principal behind the request's API key (api/auth.py)."""
    return getattr(request.state, "actor", None) or ANONYMOUS


def principal(request: Request) -> "catalog.Principal":
    """The authenticated caller (set by api.auth.authenticated, a router-level dependency)."""
    found = getattr(request.state, "principal", None)
    if found is None:  # a route outside the authenticated routers asked: a wiring bug, not a 401
        raise RuntimeError(f"{request.url.path} is not behind api.auth.authenticated")
    return found


def org_id(request: Request) -> str:
    """The caller's organisation: every catalog read and write of the request is scoped to it."""
    return principal(request).organization_id


def request_info(request: Request) -> "catalog.RequestInfo":
    ua = request.headers.get("user-agent")
    found = getattr(request.state, "principal", None)
    return catalog.RequestInfo(
        request_id=getattr(request.state, "request_id", None) or "",
        source_ip=request.client.host if request.client else None,
        user_agent=ua[:512] if ua else None,
        organization_id=found.organization_id if found is not None else None,
    )


def mark_audit(request: Request, action: str, resource_type: str, resource_id: str | None = None) -> None:
    """Name the audit action of a mutating route, so a refusal is recorded as a failure event."""
    request.state.audit_action = (action, resource_type, resource_id)


def record_failure(request: Request, action: tuple, *, status: int, code: str) -> None:
    name, resource_type, resource_id = action
    try:
        with request.app.state.session_factory() as s:
            catalog.record_audit(
                s,
                actor=actor(request),
                action=name,
                resource_type=resource_type,
                resource_id=resource_id,
                outcome="failure",
                request=request_info(request),
                details={"status": status, "code": code},
            )
            s.commit()
    except Exception:  # auditing a refusal must not turn it into a 500
        log.warning("could not record audit failure event for %s", name, exc_info=True)


def caller_may_use_withdrawn(request: Request) -> bool:
    """Whether the caller may download a withdrawn artifact when asking with ?allow_withdrawn=true:
    maintainers and admins (with auth disabled the caller is the anonymous admin)."""
    found = getattr(request.state, "principal", None)
    return found is None or found.has_role("maintainer")


async def known_query(request: Request) -> None:
    """A router dependency: a query parameter the route does not declare is a 422 naming it (a
    typo such as ``?statsu=failed`` would otherwise list everything, unfiltered)."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    unknown = sorted(set(request.query_params) - _query_names(dependant))
    if unknown:
        from api.errors import ApiError  # local: api.errors imports this module lazily too

        shown = ", ".join(repr(name[:40]) for name in unknown[:5])
        raise ApiError(422, "validation_error", f"unknown query parameter(s) {shown}",
                       details={"parameters": [name[:40] for name in unknown[:20]]})


def _query_names(dependant) -> set[str]:
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names
