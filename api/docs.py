"""GET /openapi.json (needs a key, like the API it describes) and GET /docs (a Swagger UI shell
that holds no data and sends the key with every request, the schema's included). Swagger UI's
script and styles are served by this server (api/static/vendor/swagger-ui), never a CDN.

The schema declares the bearer scheme, so generated clients and schema-driven testers (e.g.
schemathesis) know every operation but /healthz and /readyz needs ``Authorization: Bearer``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse

from api.auth import authenticated
from api.responses import JSONResponse

router = APIRouter(include_in_schema=False)

PAGE = Path(__file__).parent / "static" / "docs.html"
OPEN_PATHS = ("/healthz", "/readyz")
SCHEME = "bearer"


@router.get("/openapi.json", dependencies=[Depends(authenticated)])
def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", response_class=HTMLResponse)
def docs_page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` by one that adds the bearer scheme (computed once, then cached)."""

    def build() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                SCHEME: {"type": "http", "scheme": "bearer",
                         "description": "an API key (`quantyard keys create`; POST /v1/keys)"}}
            schema["security"] = [{SCHEME: []}]
            for path in OPEN_PATHS:
                for operation in schema["paths"].get(path, {}).values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build


__all__ = ["install_openapi", "router"]
