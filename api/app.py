"""The FastAPI application factory.

Nothing happens at import time: the catalog engine and session factory, the object store and
the Celery client (send-only) are made in :func:`create_app` and kept on ``app.state``.
Migrations are a separate step (``quantyard db upgrade``); ``auto_migrate=True`` is for the
embedded ``quantyard serve`` only.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api import dashboard, docs
from api.auth import authenticated
from api.deps import known_query
from api.errors import COMMON_ERRORS, error_responses, install_error_handlers
from api.http_metrics import HttpMetrics, HttpMetricsMiddleware
from api.metrics import make_registry
from api.middleware import BodyLimitMiddleware, RequestIdMiddleware, SecurityHeadersMiddleware
from api.responses import JSONResponse
from api.routes import artifacts, audit, capabilities, health, jobs, keys, sources
from quantyard import catalog
from quantyard.catalog.anchor import AnchorWatcher
from quantyard.catalog.audit_seal import defer_chaining
from quantyard.catalog.db import engine_options
from quantyard.gc_tuning import freeze_startup_heap
from quantyard.queue import JobDispatcher, make_celery
from quantyard.settings import Settings, get_settings
from quantyard.storage import open_store

log = logging.getLogger("quantyard.api")

API_VERSION = "0.1.0"


def create_app(settings: Settings | None = None, *, celery_app=None, auto_migrate: bool = False,
               store=None, freeze_heap: bool = False) -> FastAPI:
    """Build the API.

    ``celery_app``: a Celery app used only to send tasks (default: one made from ``settings``
    with :func:`quantyard.queue.make_celery`). ``store``: an object store (default: opened
    from ``settings.resolved_storage_url``). ``freeze_heap``: a served process (the CLI's) freezes its
    start-up heap for the garbage collector once the app has started (quantyard/gc_tuning.py);
    not in tests, which build many apps in one process.
    """
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db_url = settings.resolved_database_url
    if auto_migrate:
        catalog.upgrade_database(db_url)

    engine = catalog.make_engine(db_url, **engine_options(settings))
    session_factory = catalog.make_session_factory(engine)
    defer_chaining(engine, settings.audit_chain == "deferred")
    if store is None:
        store = open_store(settings.resolved_storage_url, endpoint_url=settings.s3_endpoint_url,
                           region=settings.s3_region)
    owns_celery = celery_app is None
    if celery_app is None:
        celery_app = make_celery(settings, name="quantyard-api")
    dispatcher = JobDispatcher(celery_app)  # submissions' messages, batched (quantyard/queue.py)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Anchors the audit chain every N events (checked beside the requests) and at shutdown.
        watcher = AnchorWatcher(session_factory, store, interval_s=0.0,
                                every_events=settings.audit_anchor_every_events).start()
        if freeze_heap:
            freeze_startup_heap()
        try:
            yield
        finally:
            await asyncio.to_thread(dispatcher.close)
            await asyncio.to_thread(watcher.stop)
            if owns_celery:
                try:
                    celery_app.close()
                except Exception:  # pragma: no cover
                    log.debug("closing celery app failed", exc_info=True)
            engine.dispose()

    app = FastAPI(
        title="Quantyard",
        version=API_VERSION,
        description="Convert and quantize Hugging Face models (GGUF, ...) with a catalog of artifacts.",
        lifespan=lifespan,
        # NaN/Infinity in a metric are written as null instead of failing the whole response.
        default_response_class=JSONResponse,
        # Served by api/docs.py: the schema needs a key like the API it describes.
        openapi_url=None, docs_url=None, redoc_url=None,
    )
    app.state.settings = settings
    app.state.db_engine = engine
    app.state.session_factory = session_factory
    app.state.store = store
    app.state.celery = celery_app
    app.state.dispatcher = dispatcher
    app.state.metrics_registry = make_registry(session_factory, settings)

    install_error_handlers(app)
    # Outermost last: security headers go on every answer, the request id's 500s included.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_json_body_bytes,
                       exempt=frozenset({("POST", "/v1/sources")}))  # streams archives, capped itself
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(app.state.metrics_registry))

    # Every /v1 router needs a valid API key (each route adds its role: api/auth.py); so do
    # /openapi.json and /metrics (the scrape token or an operator's key). Open: /healthz, /readyz
    # and the static dashboard and /docs pages, which hold no data (their calls carry the key).
    protected = [Depends(authenticated), Depends(known_query)]
    # Every status a route can answer is in the schema (tests/api/test_schemathesis.py checks it):
    # the common errors everywhere, 410 (withdrawn, deleted) for artifacts, 415 for uploads.
    routers = ((sources.router, (415,)), (jobs.router, ()), (artifacts.router, (410,)), (audit.router, ()),
               (capabilities.router, ()), (keys.router, ()))
    for router, extra in routers:
        app.include_router(router, dependencies=protected, responses=error_responses(*COMMON_ERRORS, *extra))
    app.include_router(health.router, responses=error_responses(*COMMON_ERRORS))
    app.include_router(dashboard.router)
    app.include_router(docs.router)
    dashboard.mount_static(app)
    docs.install_openapi(app)
    return app


def create_served_app() -> FastAPI:
    """The app of a ``quantyard api``/``serve`` process (uvicorn's factory for ``--workers N``)."""
    return create_app(freeze_heap=True)


__all__ = ["create_app", "create_served_app"]
