"""Run one Quantyard conversion in this process and measure its phases separately.

    python benchmarks/quantyard_phases.py SOURCE --target gguf:Q8_0 -o OUT [--skip-validation]
                                         [--json-out FILE]

The public `quantyard.engine.convert()` is called as the CLI calls it. The engine writes the
GGUF first and then validates it (`validate_gguf`: gguf-py reopens it, transformers and llama.cpp
load the model and their logits are compared). This script wraps that validation call to split
the run into phases, each with its wall time and this process's peak RSS during the phase:

  import    importing quantyard.engine (light by design: stdlib only)
  preflight reading config.json and headers (numpy and gguf get imported here)
  write     planning + reading, converting, quantizing and writing every tensor
  validate  the engine's validation (with --skip-validation nothing is checked: the file is
            published unvalidated, which the product never does)
  after-validate  whatever the engine does after a validation call (rename into place; or more
            conversion, if a future engine validates an intermediate before quantizing)

Peak RSS per phase: the kernel's high-water mark (VmHWM) reset at the start of each phase
through /proc/self/clear_refs, read at its end; where that reset is refused, a sampling thread
(every 5 ms) gives the phase's peak instead. The same thread records the peaks of the two parts
of RSS apart: anonymous memory (heap, numpy buffers) and file-backed pages (memory-mapped model
files: the kernel can drop them under pressure, but they count in RSS). This is not part of the product: it is a
benchmark harness. `quantyard convert` has no switch to skip validation, by design.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_repo_on_path  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        import os

        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_split() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes: RssAnon and RssFile + RssShmem."""
    anon = file = 0
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith(("RssFile:", "RssShmem:")):
                file += int(line.split()[1]) * 1024
    return anon, file


def _hwm() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PhaseMeter:
    """Wall time and peak RSS of consecutive phases of this process."""

    def __init__(self) -> None:
        self.phases: dict[str, dict] = {}
        self._name: str | None = None
        self._start = 0.0
        self._sampled = self._anon = self._file = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.method = "VmHWM reset per phase (/proc/self/clear_refs)"
        threading.Thread(target=self._sampler, daemon=True).start()

    def _sampler(self) -> None:
        while not self._stop.wait(0.005):
            self._take_sample()

    def _take_sample(self) -> None:
        anon, file = _rss_split()
        with self._lock:
            self._sampled = max(self._sampled, anon + file)
            self._anon = max(self._anon, anon)
            self._file = max(self._file, file)

    def _reset_hwm(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            return True
        except OSError:
            self.method = "5 ms RSS sampling (VmHWM reset refused)"
            return False

    def start(self, name: str) -> None:
        self.stop()
        self._name = name
        with self._lock:
            self._sampled = self._anon = self._file = 0
        self._take_sample()
        self._hwm_ok = self._reset_hwm()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._name is None:
            return
        seconds = time.perf_counter() - self._start
        self._take_sample()
        with self._lock:
            sampled, anon, file = self._sampled, self._anon, self._file
        peak = max(_hwm(), sampled) if self._hwm_ok else sampled
        # a phase entered again (write, validate, write, ...) accumulates: time summed, peak max
        prev = self.phases.get(self._name)
        if prev:
            prev.update(seconds=prev["seconds"] + seconds, peak_rss=max(prev["peak_rss"], peak),
                        peak_anon=max(prev["peak_anon"], anon), peak_file=max(prev["peak_file"], file),
                        entries=prev["entries"] + 1)
        else:
            self.phases[self._name] = {"seconds": seconds, "peak_rss": peak, "peak_anon": anon,
                                       "peak_file": file, "entries": 1}
        self._name = None

    def close(self) -> None:
        self.stop()
        self._stop.set()


# Modules that may call the engine's validation; each is imported (if it exists) so that its
# `from .validate import validate_gguf` binding can be wrapped too.
_CALLERS = ("quantyard.engine.gguf.converter", "quantyard.engine.gguf.gguf_output",
            "quantyard.engine.gguf.gguf_input", "quantyard.engine.stages")


def _patch_validation(meter: PhaseMeter, skip: bool) -> int:
    """Wrap validate_gguf wherever the engine refers to it; returns how many sites were patched."""
    import importlib

    try:
        validate_mod = importlib.import_module("quantyard.engine.gguf.validate")
    except ImportError:
        return 0
    original = getattr(validate_mod, "validate_gguf", None)
    if original is None:
        return 0
    for name in _CALLERS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass

    def measured_validate(path, *a, **kw):
        meter.start("validate")
        try:
            if skip:
                return {"validation": "skipped by benchmarks/quantyard_phases.py"}
            return original(path, *a, **kw)
        finally:
            # what the engine does after a validation (publish; or quantize, when it validated
            # an intermediate first) is measured apart: the process now also holds what the
            # validation left behind (torch, llama.cpp), so its RSS is not the streaming writer's
            meter.start("after-validate")

    sites = 0
    for name, mod in list(sys.modules.items()):
        if name.startswith("quantyard.engine") and getattr(mod, "validate_gguf", None) is original:
            mod.validate_gguf = measured_validate
            sites += 1
    return sites


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--target", required=True, help="e.g. gguf:Q8_0")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--skip-validation", action="store_true",
                    help="do not validate the artifact (conversion alone)")
    ap.add_argument("--json-out", type=Path, help="write the measurements here as JSON")
    args = ap.parse_args(argv)

    meter = PhaseMeter()
    result_doc: dict = {"target": args.target, "source": str(args.source),
                        "validation": "skipped" if args.skip_validation else "engine"}
    meter.start("import")
    ensure_repo_on_path()
    from quantyard.native_env import tune_native_runtimes

    tune_native_runtimes()  # as the CLI does, before the engine loads torch or llama.cpp
    from quantyard import engine

    meter.start("preflight")
    spec = engine.parse_target(args.target)
    engine.preflight(args.source, [spec])

    patched = _patch_validation(meter, args.skip_validation)
    if not patched:
        result_doc["note"] = ("the engine's validate_gguf was not found: write and validation are "
                              "measured together as 'write'")
    meter.start("write")
    rc = 0
    try:
        result = engine.convert(args.source, spec, args.output, provenance={"name": args.source.name})
    except engine.ConversionError as exc:
        result = None
        rc = 1
        result_doc["error"] = f"{spec.key}: {exc.code}: {exc}"
        print(result_doc["error"], file=sys.stderr)
    meter.close()
    if patched and "validate" not in meter.phases and result is not None:
        result_doc["note"] = "the engine never called validate_gguf: 'write' holds the whole conversion"
    result_doc.update(phases=meter.phases, rss_method=meter.method)
    if result is not None:
        result_doc.update(path=str(result.path), size_bytes=result.size_bytes, metrics=result.metrics)
    text = json.dumps(result_doc, indent=2, default=str)
    if args.json_out:
        args.json_out.write_text(text)
    print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
