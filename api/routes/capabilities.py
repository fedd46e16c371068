"""GET /v1/capabilities: what the engine can do and which hardware classes have live workers."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import Session

from api.auth import requires
from api.deps import get_session
from quantyard import catalog
from quantyard.engine.manifest import capabilities as engine_capabilities

router = APIRouter(prefix="/v1", tags=["capabilities"])


@router.get("/capabilities", summary="Formats, quantizations, architectures, hardware classes",
            dependencies=[requires("viewer")])
def capabilities(request: Request, s: Session = Depends(get_session)):
    caps = engine_capabilities()
    stale = request.app.state.settings.worker_stale_after_s
    live = catalog.live_workers(s, stale_after_s=stale)
    depth = catalog.queue_depth(s)
    counts: dict[str, int] = {}
    for w in live:
        counts[w.hardware_class] = counts.get(w.hardware_class, 0) + 1
    caps["hardware_classes"] = [
        {"name": hc, "live_workers": counts.get(hc, 0), "queued_jobs": depth.get(hc, 0)}
        for hc in caps["hardware_classes"]
    ]
    return caps
