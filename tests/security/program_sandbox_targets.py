"""Functions the sandbox tests run in quantyard.engine.sandbox's child (importable there: the
child finds this repository through PYTHONPATH). Each misbehaves in one way."""

from __future__ import annotations

import ctypes
import os
import pickle
import socket
import subprocess
import time
from pathlib import Path


def allocate(*, gib: float) -> int:
    block = bytearray(int(gib * (1 << 30)))
    return len(block)


def torch_allocate(*, gib: float) -> int:
    import torch

    return torch.empty(int(gib * (1 << 30)), dtype=torch.uint8).numel()


def spin(*, seconds: float) -> int:
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def sleep(*, seconds: float) -> None:
    time.sleep(seconds)


def write(*, path: str, mib: int) -> str:
    with open(path, "wb") as f:
        f.write(b"\0" * (mib << 20))
    return path


def segfault() -> None:
    ctypes.string_at(0)


def exit_without_result() -> None:
    os._exit(3)


def run_shell(*, marker: str) -> int:
    return subprocess.run(["touch", marker], check=False).returncode


def connect(*, port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return "connected"


def environment() -> list[str]:
    return sorted(os.environ)


def unpickle(*, data_hex: str) -> str:
    """What a loader bug would do: unpickle the upload without restriction."""
    return repr(pickle.loads(bytes.fromhex(data_hex)))


def write_file(*, path: str) -> str:
    Path(path).write_text("written from the sandbox")
    return path


def instrumented_load(*, root: str) -> dict:
    """Quantyard's program loader (program.load_torch) with every unpickler torch could reach
    instrumented: which unpickles went through weights_only, which did not."""
    from quantyard.engine.onnx.program import describe, load_torch
    from tests.security.program_unpicklers import Recorder

    with Recorder() as rec:
        try:
            load_torch(describe(Path(root)))
            outcome = "loaded"
        except Exception as e:  # the refusal is part of what is reported
            outcome = f"{type(e).__name__}: {str(e)[:300]}"
    return {"outcome": outcome, **rec.report()}


def raw_load_if_vetted(*, paths: list[str]) -> list[dict]:
    """raw_load_one over several archives (one child: torch is imported once)."""
    return [raw_load_one(path=p) for p in paths]


def raw_load_one(*, path: str) -> dict:
    """The claim the vetting makes: an archive it accepts is one whose plain torch.export.load
    (no guard of Quantyard's) unpickles only through weights_only=True."""
    import torch

    from quantyard.engine.errors import InvalidModel
    from quantyard.engine.onnx.program import vet_pt2
    from tests.security.program_unpicklers import Recorder

    try:
        vet_pt2(Path(path))
    except InvalidModel as e:
        return {"outcome": f"refused: {e.details.get('reason')}", "safe": [], "unsafe": []}
    with Recorder() as rec:
        try:
            torch.export.load(path)
            outcome = "loaded"
        except Exception as e:  # reported, not raised: the records are the point
            outcome = f"{type(e).__name__}"
    return {"outcome": outcome, **rec.report()}


def read_file(*, path: str) -> str:
    return Path(path).read_text()[:100]


def connect_unix(*, path: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        return "connected"


def fork_and_linger() -> int:
    """A payload that forks a process meant to outlive the sandbox (and tries to leave its group)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
        except OSError:
            pass
        time.sleep(300)
        os._exit(0)
    return pid
