"""Quantyard's conversion engine: a pure library, file in, file out.

Importing this package is cheap (stdlib only); the heavy modules (numpy, gguf, torch,
llama_cpp) are imported inside preflight()/convert() through the converter registry, so the
API can import the package, the manifest and the spec without pulling them in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import (
    Cancelled,
    ConversionError,
    InvalidModel,
    ResourceExhausted,
    UnsupportedArchitecture,
    UnsupportedTarget,
    ValidationFailed,
)
from .manifest import ENGINE_VERSION, MANIFEST, capabilities, supported_architectures
from .registry import get_converter, lazy_factory, register_converter, registered_formats
from .results import ConversionResult, PreflightReport
from .spec import TargetSpec, parse_target

register_converter("gguf", lazy_factory("quantyard.engine.gguf.converter", "GGUFConverter"))


def _check_architecture(source_dir: Path, targets: Sequence[TargetSpec]) -> None:
    """Fail on the architecture from config.json alone, before any weights are looked at."""
    from .hf.source import load_config

    config = load_config(Path(source_dir))
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    for target in targets:
        supported = supported_architectures(target.format)
        if archs[0] not in supported:
            raise UnsupportedArchitecture(
                f"architecture {archs[0]!r} cannot be converted to {target.format}; "
                f"supported architectures: {', '.join(supported)}",
                details={"architecture": archs[0], "supported": supported},
            )


def _load(source_dir: Path, targets: Sequence[TargetSpec]):
    from .hf.source import open_source

    targets = [parse_target(t) for t in targets]  # re-canonicalise; raises UnsupportedTarget
    _check_architecture(source_dir, targets)
    return open_source(Path(source_dir)), targets


def _program_targets(source_dir: Path, targets: Sequence[TargetSpec]) -> bool:
    """True for a program source (no config.json, one .pt2/TorchScript/.onnx file): those
    convert to ONNX only; any other target is refused naming why."""
    from .onnx.program_files import is_program_dir

    if not is_program_dir(Path(source_dir)):
        return False
    other = [t.key for t in targets if t.format != "onnx"]
    if other:
        raise UnsupportedTarget(
            f"{', '.join(other)}: gguf needs a Hugging Face folder (config.json + weights); a program source "
            "(torch.export .pt2, TorchScript or .onnx) converts to onnx targets only",
            details={"targets": other, "source": "program"})
    return True


def preflight(source_dir: Path, targets: Sequence[TargetSpec], *,
              memory_limit_bytes: int | None = None) -> PreflightReport:
    """Check a source against targets from config.json and headers; estimate each target.
    With `memory_limit_bytes`, a source that would need more memory than that to convert is
    refused here (ResourceLimit), before any weights are read."""
    targets = [parse_target(t) for t in targets]
    if _program_targets(source_dir, targets):
        from .hf.sanity import require_memory
        from .onnx.program_convert import preflight_program

        report = preflight_program(Path(source_dir), targets)
        require_memory(report.estimates, memory_limit_bytes)
        return report
    onnx = [t for t in targets if t.format == "onnx"]
    others = [t for t in targets if t.format != "onnx"]
    reports = []
    if onnx:  # encoders: their own source reader (BERT checkpoints carry int64 buffers)
        from .onnx import preflight_onnx

        _check_architecture(source_dir, onnx)
        reports.append(preflight_onnx(Path(source_dir), onnx))
    if others:
        source, others = _load(source_dir, others)
        reports.insert(0, PreflightReport(
            architecture=source.architecture, parameter_count=source.parameter_count,
            source_dtype=source.source_dtype,
            estimates={t.key: get_converter(t.format).estimate(source, t) for t in others}))
    first = reports[0]
    estimates = {k: v for r in reports for k, v in r.estimates.items()}
    from .hf.sanity import require_memory

    require_memory(estimates, memory_limit_bytes)
    return PreflightReport(architecture=first.architecture, parameter_count=first.parameter_count,
                           source_dtype=first.source_dtype, estimates=estimates)


def convert(source_dir: Path, target: TargetSpec, out_dir: Path, *,
            progress: Callable[[float, str], None] | None = None,
            provenance: Mapping[str, str] | None = None) -> ConversionResult:
    """Write one validated artifact for `target` into out_dir."""
    target = parse_target(target)
    if _program_targets(source_dir, [target]):
        from .onnx.program_convert import convert_program

        return convert_program(Path(source_dir), target, Path(out_dir), progress=progress, provenance=provenance)
    if target.format == "onnx":
        from .onnx import convert_onnx

        _check_architecture(source_dir, [target])
        return convert_onnx(Path(source_dir), target, Path(out_dir), progress=progress,
                            provenance=provenance)
    source, (target,) = _load(source_dir, [target])
    from .stages import convert_via_intermediate, is_direct

    if target.format == "gguf" and not is_direct(target):
        # llama.cpp's way: a lossless GGUF first, then its quantizer's per-tensor policy.
        return convert_via_intermediate(source, target, Path(out_dir), progress=progress,
                                        provenance=provenance)
    return get_converter(target.format).convert(source, target, Path(out_dir), progress=progress,
                                                provenance=provenance)


def onnx_fp32_spec(source_dir: Path, target: TargetSpec) -> TargetSpec | None:
    """The onnx:fp32 export an ONNX target of this Hugging Face source can be made from (targets
    with equal specs share one export, see onnx.fp32_export_spec); None for other formats and
    for program sources, which convert whole, per target."""
    from .onnx.program_files import is_program_dir

    target = parse_target(target)
    if target.format != "onnx" or is_program_dir(Path(source_dir)):
        return None
    from .onnx import fp32_export_spec

    return fp32_export_spec(Path(source_dir), target)


def quantize_onnx(source_dir: Path, fp32_onnx: Path, target: TargetSpec, out_dir: Path, *,
                  progress: Callable[[float, str], None] | None = None,
                  provenance: Mapping[str, str] | None = None) -> ConversionResult:
    """A quantized ONNX target made from an fp32 export convert() wrote for the same source
    (spec: onnx_fp32_spec); validated against the source, never against the fp32 file."""
    target = parse_target(target)
    _check_architecture(source_dir, [target])
    from .onnx import quantize_from_fp32

    return quantize_from_fp32(Path(source_dir), Path(fp32_onnx), target, Path(out_dir), progress=progress,
                              provenance=provenance)


__all__ = [
    "preflight", "convert", "onnx_fp32_spec", "quantize_onnx", "PreflightReport", "ConversionResult", "TargetSpec",
    "parse_target",
    "MANIFEST", "ENGINE_VERSION", "capabilities", "register_converter", "get_converter",
    "registered_formats", "ConversionError", "InvalidModel", "UnsupportedArchitecture",
    "UnsupportedTarget", "ValidationFailed", "Cancelled", "ResourceExhausted",
]
