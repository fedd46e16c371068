"""trim_heap hands freed heap memory back (glibc's malloc_trim), measured on this process."""

from __future__ import annotations

import ctypes
import re

import pytest

from quantyard.engine.heap import _malloc_trim, trim_heap


def _anon_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return int(re.search(r"RssAnon:\s+(\d+)", fh.read()).group(1))


@pytest.mark.skipif(_malloc_trim() is None, reason="no malloc_trim in this C library (not glibc)")
def test_freed_small_allocations_go_back_to_the_system():
    """Many small blocks (below malloc's mmap threshold, so they live in the heap) are freed
    but the last, which pins the heap's top (as any later allocation does in a real process):
    free() keeps them, a trim gives their pages back."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    blocks = [libc.malloc(64 * 1024) for _ in range(3000)]  # ~190 MiB in 64 KiB blocks
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)  # touched: resident
    for b in blocks[:-1]:
        libc.free(ctypes.c_void_p(b))
    before = _anon_kib()
    trim_heap()
    after = _anon_kib()
    libc.free(ctypes.c_void_p(blocks[-1]))
    assert before - after > 100 * 1024, (before, after)
