"""Run one function in a throwaway child process that a hostile input cannot escape cheaply.

Loaders of complex formats (torch.export, TorchScript) parse attacker-controlled bytes with
code nobody here wrote; if one of them has a bug, or a payload slips past the vetting, the
damage must stay inside a process that owns nothing. `run` starts a fresh interpreter
(`python -P -c ...`: no inherited memory, no secrets in its environment, the working directory
not on sys.path) and, before the function's module is even imported, the child:

- caps itself with setrlimit: address space (RLIMIT_AS), CPU seconds, size of any file it
  writes (RLIMIT_FSIZE), open files, no core dumps;
- works in a scratch directory (cwd, HOME, TMPDIR) and gets a minimal environment;
- as root: leaves the network (a new, empty network namespace: not even loopback) and sees the
  whole filesystem read-only except the scratch and the writable directories it was given
  (a private mount namespace with read-only bind remounts);
- with Landlock (any user, Linux >= 5.13): reads only its Python install, this package, the
  upload and a few system files; writes only the scratch and the writable directories; no TCP
  and no signals to processes outside the sandbox (newer kernels);
- sets no_new_privs and installs a seccomp filter (x86-64): no execve/execveat (a payload
  cannot start a shell), no sockets at all (not even AF_UNIX: a database's local socket stays
  connectable on a read-only filesystem), no ptrace, mount, namespaces, module loading, bpf or
  kexec.

Which of these took effect is recorded (`Outcome.protections`): a non-root worker has no
namespaces and keeps only the limits and the filter. Results come back as JSON (the parent never
unpickles anything the child wrote) plus whatever files the function wrote where told.

A crash, a limit or a timeout is a typed ConversionError (ResourceLimit for memory/CPU/time/file
size, InvalidModel for a loader that failed or died), never a dead caller. Pure library: every
limit is an argument; nothing is read from the environment.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import ConversionError, InvalidModel, ResourceLimit

REQUEST_FILE = "sandbox-request.json"
RESULT_FILE = "sandbox-result.json"
LOG_FILE = "sandbox.log"
MAX_RESULT_BYTES = 64 << 20
_CHILD = "from quantyard.engine import sandbox; sandbox._child_main()"


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = 8 << 30  # RLIMIT_AS: address space, so allow for torch's mappings
    cpu_seconds: int | None = 1800
    wall_seconds: float = 1800.0
    file_bytes: int | None = 16 << 30  # largest single file the child may write
    open_files: int = 1024


@dataclass(frozen=True)
class Outcome:
    value: object  # what the function returned (JSON)
    protections: dict = field(default_factory=dict)  # name -> True/False (or a reason string)
    seconds: float = 0.0
    peak_rss_bytes: int = 0  # the child's own peak resident memory (its VmHWM)
    cpu_seconds: float = 0.0


def run(target: str, kwargs: Mapping, *, scratch: Path, limits: Limits, label: str,
        writable: Sequence[Path] = (), readable: Sequence[Path] = (),
        on_wait: Callable[[float], None] | None = None, poll_seconds: float = 5.0) -> Outcome:
    """`target` ("package.module:function") called with JSON `kwargs` in a sandboxed child.

    `label` names what is loaded in error messages (e.g. the model file). `writable`: folders the
    child may write besides `scratch`; `readable`: what it may read besides its Python install
    and this package (e.g. the upload). `on_wait(elapsed)` is called every `poll_seconds` while
    the child runs; if it raises (e.g. Cancelled), the child is killed and the error propagates."""
    scratch = Path(scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    request = {"target": target, "kwargs": dict(kwargs), "scratch": str(scratch), "limits": limits.__dict__,
               "writable": [str(Path(w).resolve()) for w in writable],
               "readable": [str(Path(r).resolve()) for r in readable]}
    (scratch / REQUEST_FILE).write_text(json.dumps(request))
    (scratch / RESULT_FILE).unlink(missing_ok=True)
    start = time.monotonic()
    with open(scratch / LOG_FILE, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-P", "-c", _CHILD, str(scratch / REQUEST_FILE)], cwd=scratch,
                                env=_child_env(scratch), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True)
        try:
            _wait(proc, limits, label, on_wait, poll_seconds, start)
        finally:
            usage = _kill_and_reap(proc)
    outcome = _outcome(scratch, proc.returncode, label, limits, time.monotonic() - start)
    # the child's own VmHWM when it reported one; else wait4's figure (an upper bound: see _child_main)
    peak = outcome.peak_rss_bytes or usage.ru_maxrss * 1024
    return replace(outcome, peak_rss_bytes=peak, cpu_seconds=usage.ru_utime + usage.ru_stime)


def _child_env(scratch: Path) -> dict:
    """Nothing of the caller's environment (it may hold credentials): where Python finds this
    package, and a scratch home."""
    import quantyard

    package_root = str(Path(quantyard.__file__).resolve().parents[1])
    return {"PATH": "/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": str(scratch), "LANG": "C.UTF-8",
            "PYTHONPATH": package_root, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


def _wait(proc, limits: Limits, label: str, on_wait, poll_seconds: float, start: float) -> None:
    """Until the child exits (left a zombie: its process group cannot be reused yet); raise on
    the time limit or when on_wait does."""
    last = start
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        time.sleep(min(0.05 + (time.monotonic() - start) / 20, 0.5, poll_seconds))
        now = time.monotonic()
        if now - start > limits.wall_seconds:
            raise ResourceLimit(f"loading {label} took longer than its limit of {limits.wall_seconds:.0f} s",
                                details={"file": label, "limit": "time", "seconds": limits.wall_seconds})
        if on_wait is not None and now - last >= poll_seconds:
            last = now
            on_wait(now - start)  # may raise Cancelled: the finally clause kills the child


def _kill_and_reap(proc):
    """Kill the child's whole session (anything it forked), then reap it: its own rusage."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage


def _outcome(scratch: Path, returncode: int, label: str, limits: Limits, seconds: float) -> Outcome:
    result = _read_result(scratch / RESULT_FILE)
    if returncode != 0 or result is None:
        raise _death(returncode, label, limits)
    protections = result.get("protections")
    if not isinstance(protections, dict):
        protections = {}
    if "error" in result:
        raise _error(result["error"], label)
    own_peak = result.get("peak_rss_bytes")
    return Outcome(result.get("value"), protections, seconds,
                   peak_rss_bytes=own_peak if isinstance(own_peak, int) else 0)


def _read_result(path: Path) -> dict | None:
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _death(returncode: int, label: str, limits: Limits) -> ConversionError:
    """The child died without a result: which limit, or a crash of the loader."""
    sig = -returncode if returncode < 0 else None
    details = {"file": label, "exit": returncode}
    if sig in (signal.SIGXCPU, signal.SIGKILL) and limits.cpu_seconds:
        return ResourceLimit(f"loading {label} used more than its limits (CPU {limits.cpu_seconds} s, memory "
                             f"{_gib(limits.memory_bytes)}) and was stopped", details={**details, "limit": "cpu"})
    if sig == signal.SIGXFSZ:
        return ResourceLimit(f"loading {label} tried to write a file larger than {_gib(limits.file_bytes)}",
                             details={**details, "limit": "file_size"})
    what = f"signal {signal.Signals(sig).name}" if sig else f"exit status {returncode}"
    return InvalidModel(f"the loader crashed on {label} ({what}): the file is malformed or not a program this "
                        "version of torch can load", details={**details, "reason": "loader_crashed"})


def _gib(value: int | None) -> str:
    return "unlimited" if value is None else f"{value / (1 << 30):.1f} GiB"


def _error(raw, label: str) -> ConversionError:
    """A ConversionError the child raised, rebuilt by its code (unknown codes stay generic)."""
    from . import errors

    raw = raw if isinstance(raw, dict) else {}
    classes = {c.code: c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, ConversionError)}
    cls = classes.get(str(raw.get("code")), ConversionError)
    details = raw.get("details") if isinstance(raw.get("details"), dict) else {}
    message = str(raw.get("message") or f"loading {label} failed")[:2000]
    return cls(message, details=details)


# ---------------------------------------------------------------- the child side


def _own_peak_rss(status) -> int | None:
    """VmHWM of /proc/self/status (an fd opened earlier), in bytes; None if unreadable."""
    try:
        status.seek(0)
        for line in status.read().decode().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _child_main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    scratch = Path(request["scratch"])
    protections: dict = {}
    # Opened before confinement (Landlock may hide /proc later): read at the end for this
    # process's own peak RSS. wait4's ru_maxrss is not that: Linux carries the parent's peak
    # across exec, so it reports the (large) worker that spawned us.
    status = open("/proc/self/status", "rb", buffering=0)  # read at exit, closed with the process
    try:
        protections = confine(scratch, [Path(w) for w in request["writable"]], Limits(**request["limits"]),
                              readable=[Path(r) for r in request["readable"]])
        value = _call(request["target"], request["kwargs"])
        result = {"value": value, "protections": protections}
    except BaseException as e:  # every failure becomes a result; the parent types it
        result = {"error": _describe(e), "protections": protections}
    result["peak_rss_bytes"] = _own_peak_rss(status)
    (scratch / RESULT_FILE).write_text(json.dumps(result, default=str))
    os._exit(0)  # no atexit handlers, no interpreter teardown of half-built native objects


def _call(target: str, kwargs: dict):
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _describe(e: BaseException) -> dict:
    import traceback

    traceback.print_exception(e)  # into the log, for whoever operates the worker
    if isinstance(e, ConversionError):
        return e.to_dict()
    text = str(e)
    if isinstance(e, MemoryError) or "can't allocate memory" in text or "bad_alloc" in text:
        return {"code": ResourceLimit.code, "message": "the loader ran out of its memory limit",
                "details": {"limit": "memory"}}
    if isinstance(e, OSError) and e.errno == errno.EFBIG:  # RLIMIT_FSIZE (Python ignores SIGXFSZ)
        return {"code": ResourceLimit.code, "message": "the loader tried to write a file over its size limit",
                "details": {"limit": "file_size"}}
    return {"code": InvalidModel.code, "message": f"the loader failed ({type(e).__name__})",
            "details": {"reason": "loader_failed", "error": type(e).__name__}}


def confine(scratch: Path, writable: Sequence[Path], limits: Limits, *, readable: Sequence[Path] = ()) -> dict:
    """Apply every protection available to this process; say which took effect."""
    from . import sandbox_os

    done: dict[str, bool | str] = {"rlimits": sandbox_os.set_limits(limits)}
    os.chdir(scratch)
    done["network_namespace"] = sandbox_os.leave_network()
    done["read_only_filesystem"] = sandbox_os.read_only_except([scratch, *writable])
    os.chdir(scratch)  # the same folder, now seen through its writable bind mount
    done["landlock"] = sandbox_os.restrict_filesystem([*_python_paths(), *readable], [scratch, *writable])
    done["seccomp"] = sandbox_os.install_seccomp()
    return done


def _python_paths() -> list[str]:
    """This interpreter's install, its site-packages and this package (all read-only)."""
    import site

    import quantyard

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(),
             str(Path(quantyard.__file__).resolve().parents[1]), str(Path(sys.executable).resolve().parent)}
    return sorted(p for p in paths if p)


__all__ = ["Limits", "Outcome", "confine", "run"]
