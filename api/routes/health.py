"""GET /healthz (process up), GET /readyz (catalog, broker, store), GET /metrics (Prometheus).

The first two answer without a key (probes carry none), so they say which check failed and the
exception's type, never its message (a connection error names hosts and users): that goes to the
log. /metrics needs the scrape token or an operator's key (api/auth.py ``metrics_reader``).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.auth import metrics_reader
from api.responses import JSONResponse
from quantyard.queue import broker_ping

router = APIRouter(tags=["health"])
log = logging.getLogger("quantyard.api")

BROKER_TIMEOUT_S = 2.0


@router.get("/healthz", summary="The process is up")
def healthz():
    return {"status": "ok"}


def _check_catalog(app) -> None:
    with app.state.db_engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_broker(app) -> None:
    broker_ping(app.state.celery, timeout=BROKER_TIMEOUT_S)


def _check_store(app) -> None:
    app.state.store.check()


async def _run(name: str, fn, app) -> tuple[str, str | None]:
    try:
        await asyncio.wait_for(run_in_threadpool(fn, app), timeout=BROKER_TIMEOUT_S * 5)
        return name, None
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        log.warning("readiness check %s failed: %s", name, exc, exc_info=True)
        return name, f"unavailable ({type(exc).__name__})"


@router.get("/readyz", summary="Catalog, broker and object store are reachable")
async def readyz(request: Request):
    app = request.app
    results = await asyncio.gather(
        _run("catalog", _check_catalog, app),
        _run("broker", _check_broker, app),
        _run("storage", _check_store, app),
    )
    checks = {name: ("ok" if err is None else err) for name, err in results}
    failed = [name for name, err in results if err is not None]
    if failed:
        message = "; ".join(f"{name}: {checks[name]}" for name in failed)
        return JSONResponse(
            {"error": {"code": "not_ready", "message": f"not ready: {message}", "failed": failed},
             "checks": checks},
            status_code=503,
        )
    return {"status": "ok", "checks": checks}


@router.get("/metrics", summary="Prometheus metrics (computed from the catalog)",
            dependencies=[Depends(metrics_reader)], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
def metrics(request: Request):
    registry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
