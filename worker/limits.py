"""Per-conversion resource limits of a worker's pool process: memory, scratch disk, time.

* Memory: the pool process runs under RLIMIT_DATA (`apply_memory_limit`, from
  worker_process_init). Since Linux 4.7 that limit counts the heap and private writable
  mappings but not read-only file mappings, so memory-mapped model files (which the engine
  streams from) cost nothing while every tensor copy, reference model and runtime buffer does.
  Past it an allocation fails in the process (MemoryError, numpy's ArrayMemoryError, torch's
  "can't allocate memory") instead of the kernel's OOM killer taking the worker down.
* Scratch disk: `ScratchQuota` sums a task's work folder from its watch thread every few
  seconds; past the quota the next progress callback raises ResourceLimit.
* Time: Celery's soft time limit (queue.celery_config).

`resource_limit_of` turns any of these into a ResourceLimit (code "resource_limit", never
retried: the same model would hit the same limit) with a message naming the limit.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time
from pathlib import Path

from quantyard.engine.errors import ResourceLimit
from quantyard.settings import Settings

log = logging.getLogger(__name__)

# Share of the machine's memory the pool processes may use together.
MEMORY_SHARE = 0.75
SCRATCH_CHECK_INTERVAL_S = 3.0
# How allocation failures read when a library turns them into its own exception (torch's
# RuntimeError, safetensors' SafetensorError "os error 12", llama.cpp's ValueError, ...).
_ALLOC_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory",
                "std::bad_alloc", "failed to allocate", "defaultcpuallocator", "os error 12")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit(settings: Settings) -> int | None:
    """Bytes one conversion may use; None for no limit."""
    if settings.conversion_memory_bytes is not None:
        return settings.conversion_memory_bytes or None
    return int(physical_memory() * MEMORY_SHARE) // max(settings.worker_concurrency, 1)


def scratch_limit(settings: Settings) -> int | None:
    """Bytes one task's scratch folder may hold; None for no limit."""
    if settings.conversion_scratch_bytes is not None:
        return settings.conversion_scratch_bytes or None
    return 2 * (settings.max_upload_bytes + settings.max_unpacked_bytes)


def apply_memory_limit(limit: int | None) -> None:
    """Cap this process's data segment (soft limit; the hard one is left as it is)."""
    if not limit:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    log.info("conversions in process %d limited to %s of memory", os.getpid(), _gib(soft))


def current_memory_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    return None if soft == resource.RLIM_INFINITY else soft


def disk_usage(path: Path) -> int:
    """Bytes the files under `path` take on disk (allocated blocks: a sparse file counts what
    it really uses); links are not followed."""
    total = 0
    stack = [Path(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # removed meanwhile
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
    return total


class ScratchQuota:
    """The scratch-disk limit of one task's work folder, checked at most every few seconds."""

    def __init__(self, path: Path, limit: int | None, *,
                 interval_s: float = SCRATCH_CHECK_INTERVAL_S):
        self.path, self.limit, self.interval_s = Path(path), limit, interval_s
        self._last = 0.0

    def check(self, *, now: bool = False) -> ResourceLimit | None:
        """None while under the limit; `now` skips the rate limit (stage boundaries)."""
        if not self.limit or (not now and time.monotonic() - self._last < self.interval_s):
            return None
        self._last = time.monotonic()
        used = disk_usage(self.path)
        if used <= self.limit:
            return None
        return ResourceLimit(
            f"the conversion's scratch files reached {_gib(used)}, over its limit of "
            f"{_gib(self.limit)}", details={"limit": "scratch", "used_bytes": used,
                                            "limit_bytes": self.limit})


def _is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):  # numpy's ArrayMemoryError too
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    if isinstance(exc, Exception):
        text = str(exc).lower()
        return any(word in text for word in _ALLOC_WORDS)
    return False


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def resource_limit_of(exc: BaseException, settings: Settings) -> ResourceLimit | None:
    """The ResourceLimit `exc` stands for (itself, an allocation failure anywhere in its
    chain, or Celery's soft time limit); None when it is something else."""
    for link in _chain(exc):
        if isinstance(link, ResourceLimit):
            return link
        if type(link).__name__ == "SoftTimeLimitExceeded":
            limit = max(settings.task_time_limit_s - 60, 1)
            return ResourceLimit(f"the conversion ran past its time limit of {limit} s",
                                 details={"limit": "time", "limit_s": limit})
        if _is_allocation_failure(link):
            limit = current_memory_limit()
            within = f" of {_gib(limit)}" if limit else ""
            return ResourceLimit(f"the conversion ran out of memory (its limit{within} was reached)",
                                 details={"limit": "memory", "limit_bytes": limit})
    return None


__all__ = ["memory_limit", "scratch_limit", "apply_memory_limit", "current_memory_limit",
           "disk_usage", "ScratchQuota", "resource_limit_of", "physical_memory"]
