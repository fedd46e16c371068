"""Authentication (``Authorization: Bearer <key>``) and role checks, as FastAPI dependencies.

Every router but health and the static pages (dashboard, /docs) is included with :func:`authenticated` as a
router-level dependency (see ``api/app.py``), and every route names the least role it needs with
``dependencies=[requires("viewer")]``. Roles are ordered: viewer < submitter < maintainer < admin.

Answers:
- 401 + ``WWW-Authenticate: Bearer`` when the key is missing, malformed, unknown, expired or revoked
  (one message for the last four: which of them it is would help whoever holds a stolen key);
- 404 when the path names a job, source, artifact or key of another organisation (or none at all),
  whatever the role: a 403 there would tell that the resource exists;
- 403 when the caller sees the resource but its role is not enough (recorded in the audit trail).

With ``QUANTYARD_AUTH=disabled`` every request is the admin "anonymous" of the default
organisation (``quantyard serve`` allows that only on a loopback address).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError, not_found
from quantyard import catalog
from quantyard.catalog.identity import ROLE_RANK, Principal, hash_secret
from quantyard.catalog.models import DEFAULT_ORGANIZATION_ID, DEFAULT_ORGANIZATION_NAME, ApiKey, utcnow

log = logging.getLogger("quantyard.api")

ANONYMOUS_ADMIN = Principal(organization_id=DEFAULT_ORGANIZATION_ID, name="anonymous", role="admin", key_id=None,
                            organization_name=DEFAULT_ORGANIZATION_NAME)
CHALLENGE = 'Bearer realm="quantyard"'


def unauthorized(message: str, error: str = "invalid_token") -> ApiError:
    challenge = CHALLENGE if error == "missing" else f'{CHALLENGE}, error="{error}"'
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>' "
                           "(make one with `quantyard keys create`)", "missing")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("the Authorization header must be 'Bearer <key>'", "invalid_request")
    return token.strip()


class PrincipalCache:
    """Keys this API process checked in the last ``ttl_s`` seconds: sha256(secret) -> (principal,
    the key's expiry, when it was checked). Only valid keys are kept, so an unknown key is always
    looked up. A key revoked elsewhere (another API process, `quantyard keys revoke`) keeps working
    here for at most ``ttl_s`` (QUANTYARD_AUTH_CACHE_S); a revocation through this process
    (DELETE /v1/keys/{id}) empties the cache first, so here it takes effect at once."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[Principal, object, float]] = {}
        self._lock = threading.Lock()
        self._lookups: dict[str, threading.Lock] = {}

    def lookup_lock(self, digest: str) -> threading.Lock:
        """One catalog lookup per key at a time: when an entry expires under load, the requests
        that miss together wait for the first one's answer instead of each asking the catalog."""
        with self._lock:
            if len(self._lookups) > 10_000:
                self._lookups.clear()
            return self._lookups.setdefault(digest, threading.Lock())

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        principal, expires_at, checked = entry
        if time.monotonic() - checked > self.ttl_s or (expires_at is not None and expires_at <= utcnow()):
            self._entries.pop(digest, None)
            return None
        return principal

    def put(self, digest: str, principal: Principal, expires_at) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) > 10_000:  # many keys: start over rather than grow without bound
                self._entries.clear()
            self._entries[digest] = (principal, expires_at, time.monotonic())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _principal_cache(request: Request) -> PrincipalCache:
    state = request.app.state
    cache = getattr(state, "principal_cache", None)
    if cache is None:
        cache = state.principal_cache = PrincipalCache(state.settings.auth_cache_s)
    return cache


def _remembered(request: Request, secret: str) -> Principal | None:
    """The principal this process checked the key for in the last QUANTYARD_AUTH_CACHE_S (memory only)."""
    cache = _principal_cache(request)
    if request.method == "DELETE" and request.url.path.startswith("/v1/keys/"):
        cache.clear()  # a revocation: no key may be served from memory past it (in this process)
        return None
    return cache.get(hash_secret(secret))


def _lookup(request: Request, secret: str) -> Principal | None:
    """The key's principal from the catalog (and remembered for the next requests); a request
    that waited for another one's lookup of the same key takes its answer."""
    cache, digest = _principal_cache(request), hash_secret(secret)
    with cache.lookup_lock(digest):
        found = _remembered(request, secret)
        if found is not None:
            return found
        with request.app.state.session_factory() as s:
            found = catalog.authenticate(s, secret=secret)
            expires_at = s.get(ApiKey, found.key_id).expires_at if found is not None else None
            s.commit()  # last_used_at
        if found is not None:
            cache.put(digest, found, expires_at)
    return found


def _admit(request: Request, principal: Principal | None) -> Principal:
    if principal is None:
        raise unauthorized("the API key is unknown, expired or revoked")
    request.state.principal = principal
    request.state.actor = principal.name
    # Read by the download route: only maintainers may override a withdrawal.
    request.state.may_use_withdrawn = principal.has_role("maintainer")
    return principal


def _without_lookup(request: Request) -> tuple[Principal | None, str | None]:
    """(the caller, None) when known without the catalog (this request already, auth disabled, a
    key this process checked recently); else (None, the key to look up)."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached, None
    if request.app.state.settings.auth == "disabled":
        return _admit(request, ANONYMOUS_ADMIN), None
    secret = _bearer(request)
    found = _remembered(request, secret)
    return (_admit(request, found), None) if found is not None else (None, secret)


async def authenticated(request: Request) -> Principal:
    """The caller; also kept in ``request.state`` (``principal``, ``actor``) for audit records.

    Async, so a key this process checked recently costs no trip to the threadpool; only a key
    looked up in the catalog goes there (the lookup blocks)."""
    found, secret = _without_lookup(request)
    if found is not None:
        return found
    return _admit(request, await run_in_threadpool(_lookup, request, secret))


def authenticated_sync(request: Request) -> Principal:
    """:func:`authenticated` for code already off the event loop (e.g. a sync dependency)."""
    found, secret = _without_lookup(request)
    return found if found is not None else _admit(request, _lookup(request, secret))


# Path parameters that name a tenant's resource, and how to look it up within an organisation.
def _visible_job(s, ident, org):
    return catalog.get_job(s, job_id=ident, organization_id=org)


def _visible_source(s, ident, org):
    return catalog.get_source(s, source_id=ident, organization_id=org)


def _visible_artifact(s, ident, org):
    return catalog.get_artifact(s, artifact_id=ident, organization_id=org)


def _visible_key(s, ident, org):
    return catalog.get_api_key(s, key_id=ident, organization_id=org)


SCOPED_PATH_PARAMS: dict[str, tuple[str, Callable]] = {
    "job_id": ("job", _visible_job),
    "source_id": ("source", _visible_source),
    "artifact_id": ("artifact", _visible_artifact),
    "key_id": ("api_key", _visible_key),
}


def _hidden_resource(request: Request, principal: Principal) -> ApiError | None:
    """A 404 for the first resource in the path the caller's organisation cannot see, else None."""
    with request.app.state.session_factory() as s:
        for param, (kind, visible) in SCOPED_PATH_PARAMS.items():
            ident = request.path_params.get(param)
            if ident is not None and visible(s, ident, principal.organization_id) is None:
                return not_found(kind, ident)
    return None


class Requires:
    """A route dependency: the caller is authenticated and has at least ``role``."""

    def __init__(self, role: str):
        if role not in ROLE_RANK:
            raise ValueError(f"unknown role {role!r}")
        self.role = role

    async def __call__(self, request: Request, principal: Principal = Depends(authenticated)) -> Principal:
        if principal.has_role(self.role):
            return principal
        await run_in_threadpool(self._refuse, request, principal)  # reads and audits: blocking
        raise AssertionError("unreachable")  # _refuse always raises

    def _refuse(self, request: Request, principal: Principal) -> None:
        hidden = _hidden_resource(request, principal)
        if hidden is not None:
            raise hidden
        _audit_denied(request, principal, self.role)
        raise ApiError(403, "forbidden", f"this needs the {self.role} role; {principal.name} is a {principal.role}",
                       details={"required_role": self.role, "role": principal.role})

    def __repr__(self) -> str:
        return f"Requires({self.role!r})"


def requires(role: str) -> Depends:
    """``dependencies=[requires("maintainer")]`` on a route."""
    return Depends(Requires(role))


def _audit_denied(request: Request, principal: Principal, role: str) -> None:
    """Record a refused request (best effort: a failed audit write must not turn a 403 into a 500)."""
    from api.deps import request_info

    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    resource = next(((kind, request.path_params[p]) for p, (kind, _) in SCOPED_PATH_PARAMS.items()
                     if p in request.path_params), (path.split("/")[2] if path.startswith("/v1/") else "api", None))
    try:
        with request.app.state.session_factory() as s:
            catalog.record_audit(s, actor=principal.name, action="access.denied", resource_type=resource[0],
                                 resource_id=resource[1], outcome="failure", request=request_info(request),
                                 details={"method": request.method, "route": path, "required_role": role,
                                          "role": principal.role, "status": 403})
            s.commit()
    except Exception:  # noqa: BLE001
        log.warning("could not record the audit event of a refused request", exc_info=True)


def metrics_reader(request: Request) -> None:
    """``/metrics`` counts every organisation's jobs, so it is for the platform team: the scrape
    token (``QUANTYARD_METRICS_TOKEN``, for Prometheus) or a key of the operator's (default)
    organisation, any role. A tenant's key gets 403 (the endpoint is no tenant's secret)."""
    settings = request.app.state.settings
    if settings.auth == "disabled":
        return
    token = settings.metrics_token
    if token and hmac.compare_digest(_bearer(request).encode(), token.encode()):
        request.state.actor = "metrics-scraper"
        return
    principal = authenticated_sync(request)
    if principal.organization_id != DEFAULT_ORGANIZATION_ID:
        _audit_denied(request, principal, "operator")
        raise ApiError(403, "forbidden", "metrics count every organisation's jobs: they need a key of the "
                       "operator's organisation or the scrape token (QUANTYARD_METRICS_TOKEN)",
                       details={"required_role": "operator", "role": principal.role})


def is_operator(principal: Principal) -> bool:
    """An admin of the default organisation: the platform team that runs the service. Only they
    see the whole audit chain and make keys in other organisations."""
    return principal.role == "admin" and principal.organization_id == DEFAULT_ORGANIZATION_ID


__all__ = ["ANONYMOUS_ADMIN", "Requires", "authenticated", "authenticated_sync", "is_operator", "metrics_reader", "requires",
           "unauthorized"]
