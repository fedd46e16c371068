"""Scratch space per worker process, and the sweep of what dead processes left behind.

A conversion works in `job_*` / `tgt_*` folders under its process's own scratch folder,
``<scratch>/<host>-p<pid>-<start>`` (start: the process's start time in clock ticks since boot,
from /proc, so a reused pid is never taken for the folder's old owner). A process killed with
SIGKILL (the OOM killer, an operator) cannot remove its folders; whoever next creates a scratch
folder under the same base, and every worker's periodic sweep, removes the folders of owners on
this host that are no longer running. Owners on other hosts (a shared volume) are left alone:
their pids mean nothing here.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import threading
from pathlib import Path

from quantyard.storage import StorageError

log = logging.getLogger(__name__)

_OWNER = re.compile(r"^(?P<host>.+)-p(?P<pid>\d+)-(?P<start>\d+)$")
_sweeping = threading.Lock()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _start_ticks(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/<pid>/stat), None if it is gone or a zombie;
    0 where there is no /proc (then only whether the pid exists is known)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # exists, someone else's
            pass
        return 0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):  # killed, not yet reaped: as good as gone
        return None
    return int(fields[19])


def owner_name(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{_host()}-p{pid}-{_start_ticks(pid) or 0}"


def is_dead_owner(name: str) -> bool:
    """True when `name` is the folder of a process on this host that no longer runs."""
    match = _OWNER.match(name)
    if match is None or match["host"] != _host():
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    start = _start_ticks(pid)
    return start is None or (0 not in (start, int(match["start"])) and start != int(match["start"]))


def sweep_scratch(base: Path) -> list[str]:
    """Remove the scratch folders of dead processes under `base`; returns their names."""
    removed = []
    try:
        entries = list(Path(base).iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir() or not is_dead_owner(entry.name):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry.name)
    if removed:
        log.info("scratch: removed the folders of %d dead worker process(es): %s", len(removed),
                 ", ".join(removed))
    return removed


def process_scratch_dir(base: Path) -> Path:
    """This process's own scratch folder under `base` (created), after sweeping dead owners'."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    sweep_scratch(base)
    mine = base / owner_name()
    mine.mkdir(exist_ok=True)
    return mine


def sweep(runtime, *, scratch_base: Path) -> None:
    """One sweep: dead processes' scratch folders, then temporary objects in the store older
    than settings.storage_temp_max_age_s. Errors are logged; the next sweep tries again."""
    if not _sweeping.acquire(blocking=False):
        return  # the previous sweep is still going (a slow store)
    try:
        sweep_scratch(scratch_base)
        removed = runtime.store.sweep_temp(runtime.settings.storage_temp_max_age_s)
        if removed:
            log.info("storage: removed %d stale temporary object(s) or upload(s)", removed)
    except StorageError as exc:  # the store is down: the next sweep tries again
        log.warning("sweep of temporary objects skipped: %s", exc)
    except Exception:  # noqa: BLE001 - a sweep must never take the worker down
        log.exception("sweep failed")
    finally:
        _sweeping.release()


def sweep_in_background(runtime, *, scratch_base: Path) -> None:
    """Run `sweep` on a daemon thread: a store that is down must not stall the caller (the
    consumer's event loop, which also pulls messages and beats)."""
    threading.Thread(target=sweep, args=(runtime,), kwargs={"scratch_base": scratch_base},
                     name="quantyard-sweep", daemon=True).start()


def scratch_base(settings) -> Path:
    """Where every worker process on this data dir keeps its scratch folder."""
    return settings.data_dir / "scratch"
