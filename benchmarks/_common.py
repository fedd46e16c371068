"""Shared pieces of the benchmark scripts: run a command while measuring its process tree's
wall time and peak RSS, compare two GGUF files, print tables.

Peak RSS of a process tree = the highest value seen of the sum of the RSS of every process in
the tree (psutil, polled every `interval` seconds (50 ms)), and never less than the largest per-process
high-water mark (VmHWM from /proc, which also catches a spike shorter than the polling interval
in a single process). Shared pages count once per process, as RSS always does.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def ensure_repo_on_path() -> None:
    """So `tests.fixtures...` and `quantyard` import when a script is run from anywhere."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


# ------------------------------------------------------------------------ peak RSS measurement


def _status_kb(pid: int, field: str) -> int:
    """One size field of /proc/<pid>/status ("VmHWM", "RssAnon") in bytes, 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _vm_hwm(pid: int) -> int:
    """A process's peak RSS in bytes (Linux VmHWM), 0 when unreadable."""
    return _status_kb(pid, "VmHWM")


class TreePeakRSS:
    """Polls a process and all its descendants; `.peak` is the tree's peak RSS in bytes."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self._psutil = psutil
        self._root = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._hwm: dict[int, int] = {}
        self.sampled_peak = 0
        # anonymous memory (heap, arrays) summed over the tree: RSS also counts mapped file pages,
        # which the kernel can drop; sampled only (Linux keeps no high-water mark of it)
        self.anon_peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreePeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        psutil = self._psutil
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return
        total = anon = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
            hwm = _vm_hwm(p.pid)
            if hwm:
                self._hwm[p.pid] = max(self._hwm.get(p.pid, 0), hwm)
            anon += _status_kb(p.pid, "RssAnon")
        self.sampled_peak = max(self.sampled_peak, total)
        self.anon_peak = max(self.anon_peak, anon)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    @property
    def peak(self) -> int:
        return max([self.sampled_peak, *self._hwm.values()])


@dataclass
class Measured:
    argv: list[str]
    returncode: int
    seconds: float
    peak_rss: int
    stdout: str
    stderr: str
    peak_anon: int = 0  # RssAnon summed over the tree, sampled

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_measured(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 timeout: float | None = None) -> Measured:
    """Run argv to completion; wall time and peak RSS of its whole process tree."""
    import psutil

    full_env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    proc = psutil.Popen(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        env=full_env, cwd=cwd)
    with TreePeakRSS(proc.pid) as mon:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    seconds = time.perf_counter() - start
    return Measured([str(a) for a in argv], proc.returncode, seconds, mon.peak, out, err, mon.anon_peak)


# ------------------------------------------------------------------------------ GGUF comparison


@dataclass
class GGUFComparison:
    identical_tensors: bool
    tensor_count: tuple[int, int]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    type_differs: list[str] = field(default_factory=list)  # "name: A vs B"
    shape_differs: list[str] = field(default_factory=list)
    bytes_differ: list[str] = field(default_factory=list)
    metadata_only_in_a: list[str] = field(default_factory=list)
    metadata_only_in_b: list[str] = field(default_factory=list)
    metadata_differs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.identical_tensors:
            return "identical"
        parts = []
        for label, items in (("only in ours", self.only_in_a), ("only in llama.cpp", self.only_in_b),
                             ("type", self.type_differs), ("shape", self.shape_differs),
                             ("bytes", self.bytes_differ)):
            if items:
                parts.append(f"{label}: {len(items)}")
        return "DIFFERENT (" + ", ".join(parts) + ")"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _field_value(field_) -> object:
    try:
        value = field_.contents()
    except Exception:  # noqa: BLE001 - older gguf-py or an odd type: fall back to raw parts
        value = [bytes(p).hex() for p in field_.parts[-1:]]
    if isinstance(value, list) and len(value) > 16:  # token lists etc.: compare by digest
        return "sha256:" + hashlib.sha256(repr(value).encode()).hexdigest()[:16] + f" ({len(value)} items)"
    return value


def gguf_metadata(path: Path) -> dict[str, object]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def compare_gguf(a: Path, b: Path) -> GGUFComparison:
    """Tensor names, types, shapes and bytes (must be identical) and metadata (reported)."""
    import gguf

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    cmp = GGUFComparison(identical_tensors=False, tensor_count=(len(ta), len(tb)))
    cmp.only_in_a = sorted(set(ta) - set(tb))
    cmp.only_in_b = sorted(set(tb) - set(ta))
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type:
            cmp.type_differs.append(f"{name}: {x.tensor_type.name} vs {y.tensor_type.name}")
            continue
        if list(x.shape) != list(y.shape):
            cmp.shape_differs.append(f"{name}: {list(x.shape)} vs {list(y.shape)}")
            continue
        if x.data.tobytes() != y.data.tobytes():
            cmp.bytes_differ.append(name)
    cmp.identical_tensors = not (cmp.only_in_a or cmp.only_in_b or cmp.type_differs or cmp.shape_differs
                                 or cmp.bytes_differ)
    ma = {n: _field_value(f) for n, f in ra.fields.items() if not n.startswith("GGUF.")}
    mb = {n: _field_value(f) for n, f in rb.fields.items() if not n.startswith("GGUF.")}
    cmp.metadata_only_in_a = sorted(set(ma) - set(mb))
    cmp.metadata_only_in_b = sorted(set(mb) - set(ma))
    cmp.metadata_differs = sorted(k for k in set(ma) & set(mb) if ma[k] != mb[k])
    return cmp


def tensor_type_counts(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


# -------------------------------------------------------------------------------------- output


def fmt_mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:,.0f}"


def fmt_s(s: float | None) -> str:
    return "-" if s is None else f"{s:,.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |"  # noqa: E731
    sep = "|-" + "-|-".join("-" * w for w in widths) + "-|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def last_line(text: str, limit: int = 160) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]
