"""The stages a job is split into, so one job's targets can run as separate tasks:

1. `make_intermediate`: the source, converted once to a lossless GGUF in its own precision.
2. `compute_imatrix` (when a target wants one): importance weights from calibration text.
3. `quantize`: the intermediate (or a GGUF the user gave) to one target, validated.

Light to import: heavy modules load inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from .results import ConversionResult, PreflightReport
from .spec import TargetSpec

Progress = Callable[[float, str], None]
LOSSLESS_TYPES = ("F32", "F16", "BF16")


def intermediate_target(report: PreflightReport) -> TargetSpec:
    """The GGUF float type that holds the source without rounding."""
    dtype = report.source_dtype.upper()
    return TargetSpec("gguf", dtype if dtype in LOSSLESS_TYPES else "F32")


def make_intermediate(source_dir: Path, report: PreflightReport, out_dir: Path, *,
                      progress: Progress | None = None,
                      provenance: Mapping[str, str] | None = None) -> ConversionResult:
    from . import convert

    return convert(source_dir, intermediate_target(report), out_dir, progress=progress,
                   provenance=provenance)


def quantize(input_gguf: Path, target: TargetSpec, out_dir: Path, *, reference: Path,
             imatrix: Path | None = None, progress: Progress | None = None,
             provenance: Mapping[str, str] | None = None) -> ConversionResult:
    """One target from a GGUF, validated against `reference` (the HF source folder)."""
    from . import convert

    # Until GGUF-to-GGUF quantization lands, targets are converted from the reference source.
    return convert(reference, target, out_dir, progress=progress, provenance=provenance)
