"""GET /: a single static HTML page (plain JS, no build step) that polls the API; /static: its
script and styles and those of /docs (no inline script or style: the pages' CSP refuses them)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).parent / "static"
PAGE = STATIC / "dashboard.html"


@router.get("/", response_class=HTMLResponse)
def dashboard() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


def mount_static(app: FastAPI) -> None:
    """/static/...: files of api/static only (StaticFiles refuses paths leaving the folder)."""
    app.mount("/static", StaticFiles(directory=STATIC, html=False), name="static")
