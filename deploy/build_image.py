#!/usr/bin/env python3
"""Build one of deploy/Dockerfile.* into an OCI image without Docker or a registry.

Where `docker build` pulls the base images, this takes a Debian root filesystem made by
`mmdebstrap` (Debian's packages, the one registry reachable here) with the packages that stand in
for that base, then carries out the Dockerfile's own instructions stage by stage: RUN in a chroot
(with /dev, /proc and the host's resolv.conf), COPY from the build context or an earlier stage,
ENV, WORKDIR, USER. The final stage becomes an image in an OCI layout with `umoci`, its config
(entrypoint, command, environment, user, working directory, ports, stop signal) from the
Dockerfile. `runc` runs it (scripts/run-image.sh, tests/deploy/test_image_build.py).

    sudo python3 deploy/build_image.py deploy/Dockerfile.api --layout .test-cache/oci --tag api

Differences from `docker build`, on purpose or by necessity: the Python of the stand-in base is
Debian bookworm's python3 (3.11.2), not python.org's 3.11.13 of the python:* images; HEALTHCHECK
is recorded by neither OCI nor runc (the test runs its command itself); the image is one layer.
Needs root, mmdebstrap and umoci (apt-get install mmdebstrap umoci runc).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
# The Debian packages that stand in for each base image the Dockerfiles name. The full python
# image has compilers (the build stage); the slim one only Python (the final stage).
STAND_INS = {
    "python:3.11.13-bookworm": ["python3", "python3-venv", "python-is-python3", "ca-certificates",
                                "build-essential", "cmake", "git"],
    "python:3.11.13-slim-bookworm": ["python3", "python-is-python3", "ca-certificates", "passwd"],
}
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def stages(text: str) -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by stage; the ARGs before the first FROM
    form stage 0."""
    joined = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out: list[list[str]] = [[]]
    for line in lines:
        if line.upper().startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), value)


def sh(*args: str, **kw) -> None:
    print("+", " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    subprocess.run(args, check=True, **kw)


def base_rootfs(image: str, cache: Path, into: Path) -> None:
    """The stand-in for ``image`` unpacked into ``into`` (the mmdebstrap tarball is cached by its package list)."""
    if image not in STAND_INS:
        raise SystemExit(f"no Debian stand-in for the base image {image!r} (known: {', '.join(STAND_INS)})")
    packages = STAND_INS[image]
    tarball = cache / f"{SUITE}-{hashlib.sha256(' '.join(packages).encode()).hexdigest()[:12]}.tar"
    if not tarball.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")
        sh("mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(partial))
        partial.rename(tarball)
    into.mkdir(parents=True)
    sh("tar", "-xf", str(tarball), "-C", str(into))


class Stage:
    def __init__(self, name: str, rootfs: Path):
        self.name, self.rootfs = name, rootfs
        self.env = {"PATH": DEFAULT_PATH}
        self.args: dict[str, str] = {}  # the stage's ARGs: in RUN's environment, not the image's
        self.workdir, self.user = "/", "0:0"
        self.config: dict[str, list[str] | str] = {}

    def path(self, in_image: str) -> Path:
        return self.rootfs / os.path.join(self.workdir, in_image).lstrip("/")

    def run(self, command: str) -> None:
        """RUN: /bin/sh -c in a chroot of this stage, with /dev, /proc and name resolution."""
        resolv = self.rootfs / "etc" / "resolv.conf"
        saved = resolv.read_bytes() if resolv.exists() and not resolv.is_symlink() else None
        resolv.unlink(missing_ok=True)
        shutil.copyfile("/etc/resolv.conf", resolv)
        # the host's CA bundle for the RUN only, as a build-time mount: this machine reaches PyPI
        # through a TLS-inspecting proxy whose CA Debian's bundle does not have
        bundle = self.rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt"
        ca = f"mount --bind {HOST_CA} {shlex.quote(str(bundle))} && " if Path(HOST_CA).exists() and bundle.exists() else ""
        script = (f"mount --rbind /dev {shlex.quote(str(self.rootfs / 'dev'))} && "
                  f"mount -t proc proc {shlex.quote(str(self.rootfs / 'proc'))} && {ca}"
                  f"exec chroot --userspec={self.user} {shlex.quote(str(self.rootfs))} "
                  f"/bin/sh -c {shlex.quote(f'cd {shlex.quote(self.workdir)} && {command}')}")
        try:
            sh("unshare", "--mount", "sh", "-c", script, env={**self.args, **self.env})
        finally:
            resolv.unlink()
            if saved is not None:
                resolv.write_bytes(saved)

    def copy(self, args: list[str], stages_by_name: dict[str, Stage], ignored: list[str]) -> None:
        """COPY [--from=stage] SRC... DEST, Docker's way: a folder's contents go into DEST; from the
        build context without what the .dockerignore's ``**/NAME`` lines leave out."""
        source_root, ignore = ROOT, shutil.ignore_patterns(*ignored)
        if args[0].startswith("--from="):
            source_root = stages_by_name[args.pop(0).split("=", 1)[1]].rootfs
            ignore = None
        *sources, dest = args
        target = self.path(dest)
        for src in sources:
            origin = source_root / src.lstrip("/")
            if origin.is_dir():
                shutil.copytree(origin, target, symlinks=True, dirs_exist_ok=True, ignore=ignore)
            else:
                into = target / origin.name if dest.endswith("/") else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into)


def declared_arg(line: str, build_args: dict[str, str]) -> tuple[str, str]:
    """``ARG NAME[=default]`` as (name, value): the --build-arg given, else the default."""
    name, _, default = line[4:].strip().partition("=")
    return name, build_args.get(name, default)


def build(dockerfile: Path, workdir: Path, cache: Path, build_args: dict[str, str] | None = None) -> Stage:
    given = build_args or {}
    preamble, *parts = stages(dockerfile.read_text())
    args = dict(declared_arg(line, given) for line in preamble if line.startswith("ARG "))
    dockerignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    ignored = [ln.strip()[3:] for ln in dockerignore.read_text().splitlines() if ln.strip().startswith("**/")] \
        if dockerignore.exists() else []
    by_name: dict[str, Stage] = {}
    stage = None
    for index, part in enumerate(parts):
        words = part[0].split()
        name = words[3] if len(words) == 4 and words[2].upper() == "AS" else str(index)
        stage = Stage(name, workdir / f"stage-{index}")
        base_rootfs(expand(words[1], args), cache, stage.rootfs)
        for line in part[1:]:
            keyword, _, rest = line.partition(" ")
            keyword = keyword.upper()
            if keyword == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    stage.env[key] = expand(value, stage.env)
            elif keyword == "WORKDIR":
                stage.workdir = os.path.join(stage.workdir, rest)
                stage.path(".").mkdir(parents=True, exist_ok=True)
            elif keyword == "RUN":
                stage.run(rest)
            elif keyword == "COPY":
                stage.copy(shlex.split(rest), by_name, ignored)
            elif keyword == "USER":
                stage.user = rest if ":" in rest else f"{rest}:{rest}"
            elif keyword in ("ENTRYPOINT", "CMD"):
                stage.config[keyword] = json.loads(rest)
            elif keyword in ("EXPOSE", "STOPSIGNAL"):
                stage.config[keyword] = rest
            elif keyword == "ARG":
                arg, value = declared_arg(line, given)
                stage.args[arg] = value or args.get(arg, "")  # a global ARG brought into the stage
            elif keyword != "HEALTHCHECK":
                raise SystemExit(f"{dockerfile.name}: {keyword} is not handled by this builder")
        by_name[name] = stage
    assert stage is not None, "no FROM"
    return stage


def to_oci(stage: Stage, layout: Path, tag: str, workdir: Path) -> None:
    """The stage's root filesystem as image ``layout:tag`` (one layer), its config from the Dockerfile."""
    ref = f"{layout}:{tag}"
    if not layout.exists():
        sh("umoci", "init", "--layout", str(layout))
    sh("umoci", "new", "--image", ref)
    bundle = workdir / "bundle"
    sh("umoci", "unpack", "--image", ref, str(bundle))
    shutil.rmtree(bundle / "rootfs")
    stage.rootfs.rename(bundle / "rootfs")
    sh("umoci", "repack", "--image", ref, str(bundle))
    config = ["--config.user", stage.user, "--config.workingdir", stage.workdir]
    config += [a for e in stage.config.get("ENTRYPOINT", []) for a in ("--config.entrypoint", e)]
    config += [a for c in stage.config.get("CMD", []) for a in ("--config.cmd", c)]
    config += [a for k, v in stage.env.items() for a in ("--config.env", f"{k}={v}")]
    config += [a for p in str(stage.config.get("EXPOSE", "")).split() for a in ("--config.exposedports", f"{p}/tcp")]
    if "STOPSIGNAL" in stage.config:
        config += ["--config.stopsignal", str(stage.config["STOPSIGNAL"])]
    sh("umoci", "config", "--image", ref, *config)
    sh("umoci", "gc", "--layout", str(layout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dockerfile", type=Path)
    parser.add_argument("--layout", type=Path, required=True, help="OCI layout folder (made if missing)")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--cache", type=Path, default=ROOT / ".test-cache" / "debian-rootfs",
                        help="where the mmdebstrap tarballs are kept")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="an ARG's value, as docker build's --build-arg (repeatable)")
    ns = parser.parse_args()
    build_args = dict(a.partition("=")[::2] for a in ns.build_arg)
    if os.geteuid() != 0:
        raise SystemExit("needs root (chroot, mount namespaces, umoci unpack as root)")
    layout = ns.layout.resolve()
    layout.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantyard-image-", dir=layout.parent) as tmp:
        final = build(ns.dockerfile.resolve(), Path(tmp), ns.cache.resolve(), build_args)
        to_oci(final, layout, ns.tag, Path(tmp))
    print(f"{ns.layout}:{ns.tag}")


if __name__ == "__main__":
    main()
