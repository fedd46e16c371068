"""Read the images' Dockerfiles: their stages, and what the final stage gives a container
(environment, entrypoint, command, exposed ports, the files it copies in from the build context)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from deploy.build_image import expand, stages
from tests.deploy import render

DEPLOY = render.ROOT / "deploy"


@dataclass
class ImageConfig:
    """The final stage of a Dockerfile as a container starts from it."""

    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    exposed: list[int] = field(default_factory=list)
    copied: dict[str, Path] = field(default_factory=dict)  # path in the image -> file of the build context


def image_config(dockerfile: Path, base_env: dict[str, str]) -> ImageConfig:
    """``base_env`` stands for the base image's environment (its PATH)."""
    config = ImageConfig(env=dict(base_env))
    for line in stages(dockerfile.read_text())[-1]:
        word, _, rest = line.partition(" ")
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                config.env[name] = expand(value, config.env)
        elif word == "ENTRYPOINT":
            config.entrypoint = json.loads(rest)
        elif word == "CMD":
            config.cmd = json.loads(rest)
        elif word == "EXPOSE":
            config.exposed += [int(p.split("/")[0]) for p in rest.split()]
        elif word == "COPY" and not rest.startswith("--from"):
            source, target = rest.split()
            config.copied[target] = render.ROOT / source
    return config
