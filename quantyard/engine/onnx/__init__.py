"""Quantyard's ONNX engine (not yet in the engine MANIFEST: the service isn't wired for it).

Hugging Face encoders (BERT family) -> ONNX fp32 via torch.onnx, fused by onnxruntime's
transformer optimizer, then fp16 / int8-dynamic / int8-static (QDQ) / int4 (MatMulNBits); every
artifact validated against PyTorch in onnxruntime and measured. Decoder LLMs (Llama, GPT-2,
Qwen2) -> ONNX with past key/values, then fp16 / int8-dynamic / int4, validated on prefill logits
and greedy generation against transformers (decoder_convert.py). Light to import: torch,
onnx and onnxruntime load inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..results import ConversionResult, PreflightReport
from ..spec import TargetSpec
from .manifest import ONNX_MANIFEST
from .options import parse_options
from .source import describe


def preflight_onnx(source: Path, targets: Sequence[TargetSpec]) -> PreflightReport:
    """config.json and headers only: reject what can't be made, estimate what can."""
    from .estimate import estimate

    src = describe(Path(source))  # UnsupportedArchitecture / InvalidModel
    if src.task == "text-generation":
        from .decoder_preflight import preflight_decoder

        return preflight_decoder(src, targets)  # int8-static refused there, before any heavy work
    opts = [parse_options(t) for t in targets]  # UnsupportedTarget on bad params
    if src.weights == "safetensors":
        # headers only; not open_source(): its GGUF-oriented dtype check refuses the int64
        # position_ids buffer BERT checkpoints carry
        from ..hf.source import checked_tensors

        tensors = checked_tensors(src.root, src.config)
        count, dtype = sum(t.n_elements for t in tensors.values()), _dominant(tensors)
    else:
        # a pickle has no header to read: its size is all we know without loading it
        tensors, dtype = {}, "unknown"
        count = (src.root / src.weights).stat().st_size // 4
    estimates = {t.key: (estimate(tensors, o.quantization) if tensors else {"size_bytes": count * 4})
                 for t, o in zip(targets, opts, strict=False)}
    return PreflightReport(architecture=src.architecture, parameter_count=count, source_dtype=dtype,
                           estimates=estimates)


def _dominant(tensors) -> str:
    from ..dominant import dominant_type

    return dominant_type((t.dtype, t.n_elements) for t in tensors.values())


def convert_onnx(source: Path, target: TargetSpec, out_dir: Path, *,
                 progress: Callable[[float, str], None] | None = None,
                 provenance: Mapping[str, str] | None = None) -> ConversionResult:
    """One validated ONNX artifact for `target` (format "onnx") in out_dir."""
    from .convert import convert_onnx as _convert

    return _convert(Path(source), target, Path(out_dir), progress=progress, provenance=provenance)


def fp32_export_spec(source: Path, target: TargetSpec) -> TargetSpec:
    """The onnx:fp32 export `target` can be quantized from (or, for an fp32 target, is): only the
    params that change the export (opset) are kept, and the source kind's default opset is left
    out, so targets with equal specs can share one export and a plain onnx:fp32 names the same
    recipe as the export itself. Raises UnsupportedTarget on bad params."""
    from .decoder_options import DecoderOptions, parse_decoder_options
    from .options import OnnxOptions

    if describe(Path(source)).task == "text-generation":
        opset, default = parse_decoder_options(target).opset, DecoderOptions.opset
    else:
        opset, default = parse_options(target).opset, OnnxOptions.opset
    return TargetSpec("onnx", "fp32", {} if opset == default else {"opset": opset})


def quantize_from_fp32(source: Path, fp32_onnx: Path, target: TargetSpec, out_dir: Path, *,
                       progress: Callable[[float, str], None] | None = None,
                       provenance: Mapping[str, str] | None = None) -> ConversionResult:
    """A quantized target from the fp32 artifact convert_onnx made for `source` (one export
    shared by a job's targets); still validated against `source` in PyTorch."""
    from .convert import quantize_from_fp32 as _quantize

    return _quantize(Path(source), Path(fp32_onnx), target, Path(out_dir), progress=progress,
                     provenance=provenance)


__all__ = ["ONNX_MANIFEST", "convert_onnx", "fp32_export_spec", "preflight_onnx", "quantize_from_fp32"]
