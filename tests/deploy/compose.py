"""docker-compose.yml as `docker compose up` reads it: variables interpolated, each service's
command on its image's entrypoint with the image's environment under the service's, the start
order its `depends_on` gives."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy import render
from tests.deploy.images import ImageConfig, image_config

COMPOSE = render.ROOT / "docker-compose.yml"
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:?\?)([^}]*)\}")


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ``${VAR?message}`` / ``${VAR:?message}`` (required) and ``$$`` (a literal $).
    Other forms (defaults) are refused: the file must not use them for its secrets."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, required, message = match.groups()
        if name not in values or (required == ":?" and not values[name]):
            raise KeyError(f"{name}: {message}")
        return values[name]

    assert "${" not in _VARIABLE.sub("", text), f"a compose variable form this reader does not know: {text}"
    return _VARIABLE.sub(one, text)


def load(values: dict[str, str]) -> dict[str, Any]:
    """The file parsed, then every string value interpolated (as compose does: comments are not)."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return interpolate(node, values) if isinstance(node, str) else node

    return walk(yaml.safe_load(COMPOSE.read_text()))


@dataclass
class Service:
    name: str
    spec: dict[str, Any]
    image: ImageConfig

    @property
    def command(self) -> list[str]:
        """What the container runs: the image's entrypoint and the service's command (or the image's CMD)."""
        entrypoint = self.spec.get("entrypoint", self.image.entrypoint)
        return [*entrypoint, *self.spec.get("command", self.image.cmd)]

    @property
    def mount_paths(self) -> list[str]:
        """Where volumes and tmpfs are mounted in the container."""
        tmpfs = self.spec.get("tmpfs", [])
        paths = [t.split(":")[0] for t in ([tmpfs] if isinstance(tmpfs, str) else tmpfs)]
        return paths + [v.split(":")[1] for v in self.spec.get("volumes", []) if isinstance(v, str)]


def services(compose: dict[str, Any], names: list[str], base_env: dict[str, str]) -> dict[str, Service]:
    """The named services with the final stage of the Dockerfile each one's image is built from
    (the service that has a `build` for that image names the Dockerfile)."""
    dockerfiles: dict[str, Path] = {}
    for spec in compose["services"].values():
        if "build" in spec:
            dockerfiles[spec["image"]] = render.ROOT / spec["build"]["context"] / spec["build"]["dockerfile"]
    return {name: Service(name, compose["services"][name], image_config(dockerfiles[compose["services"][name]["image"]],
                                                                         base_env))
            for name in names}


def start_order(compose: dict[str, Any], names: list[str]) -> list[str]:
    """The named services, each after what it depends on (dependencies outside ``names``, the
    infrastructure the test provides, are taken as healthy)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle {path}"
        if name in order:
            return
        for dep in compose["services"][name].get("depends_on", {}):
            if dep in names:
                visit(dep, (*path, name))
        order.append(name)

    for name in names:
        visit(name, ())
    return order


def one_off(compose: dict[str, Any], name: str) -> bool:
    """A service others wait for to complete (the migrations), not to be healthy."""
    return any(deps.get(name, {}).get("condition") == "service_completed_successfully"
               for deps in (s.get("depends_on", {}) for s in compose["services"].values()))


def duration_s(text: str) -> int:
    """A compose duration ("6h5m", "20s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", text))
