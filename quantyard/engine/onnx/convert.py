"""The ONNX conversion, in stages: load the source, export fp32 (+ fusions), quantize,
validate against PyTorch, measure. `convert_onnx` runs them all; `quantize_from_fp32` starts
from an fp32 artifact already made (and validated) for the same source, so one job's targets can
share a single export."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..manifest import ENGINE_VERSION
from ..results import ConversionResult
from ..spec import TargetSpec
from .modelio import artifact_files, artifact_size, consolidate, finalize
from .options import OnnxOptions, parse_options
from .samples import LATENCY_TEXT, THROUGHPUT_BATCH, VALIDATION_TEXTS
from .source import EncoderSource, describe, load_model, load_tokenizer

if TYPE_CHECKING:
    from .decoder_options import DecoderOptions

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Loaded:
    """The PyTorch source, loaded once per conversion."""

    src: EncoderSource
    model: object
    tokenizer: object
    names: tuple[str, ...]
    output: str


def load(source: Path) -> Loaded:
    from .export import OUTPUT_NAMES, input_names

    src = describe(source)
    model, tokenizer = load_model(src), load_tokenizer(src)
    return Loaded(src, model, tokenizer, tuple(input_names(model, tokenizer)), OUTPUT_NAMES[src.task])


def output_filename(name: str, quantization: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return f"{safe}-{quantization}.onnx"


def _tell(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)  # may raise Cancelled: that is how a job stops


def export_optimized(loaded: Loaded, path: Path, opts: OnnxOptions, work: Path) -> dict:
    """fp32 export, then the transformer optimizer's fusions, written at `path`."""
    from .export import export_fp32
    from .optimize import optimize

    raw = work / "exported.onnx"
    info = export_fp32(loaded.model, loaded.tokenizer, loaded.src.task, raw, opset=opts.opset,
                       example_texts=VALIDATION_TEXTS[:2])
    info["fused_operators"] = optimize(raw, path, loaded.src.config)
    consolidate(path)
    return info


def _quantize(loaded: Loaded, fp32: Path, dst: Path, opts: OnnxOptions) -> dict:
    from .quantize import QUANTIZERS, QuantContext

    ctx = QuantContext(loaded.src.config, loaded.tokenizer, loaded.names)
    info = QUANTIZERS[opts.quantization](fp32, dst, opts, ctx)
    consolidate(dst)
    return info


def _stamp(path: Path, provenance: Mapping[str, str] | None, opts: OnnxOptions | DecoderOptions) -> None:
    """Provenance in the model's metadata_props (tensors stay where they are)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {"quantized_by": "Quantyard", "quantyard.engine_version": ENGINE_VERSION,
             "quantyard.quantization": opts.quantization}
    props.update({f"quantyard.{k}": str(v) for k, v in (provenance or {}).items() if v})
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(path))


def _check_and_measure(loaded: Loaded, path: Path, opts: OnnxOptions) -> dict:
    from .measure import measure
    from .validate import torch_outputs, validate

    ref, feeds = torch_outputs(loaded.model, loaded.tokenizer, loaded.names, loaded.output, VALIDATION_TEXTS)
    metrics = validate(path, ref, feeds, max_abs_diff=opts.max_abs_diff, min_cosine=opts.min_cosine)
    batch = [VALIDATION_TEXTS[i % len(VALIDATION_TEXTS)] for i in range(THROUGHPUT_BATCH)]
    metrics.update(measure(path, loaded.tokenizer, loaded.names, latency_text=LATENCY_TEXT, batch_texts=batch))
    return metrics


def finish(loaded: Loaded, path: Path, opts: OnnxOptions, info: dict, fp32_size: int, *,
           provenance: Mapping[str, str] | None, progress: Progress | None) -> ConversionResult:
    _stamp(path, provenance, opts)
    finalize(path, external_data=opts.external_data)  # validated as it ships
    _tell(progress, 0.8, "validating against PyTorch")
    metrics = _check_and_measure(loaded, path, opts)
    size = artifact_size(path)
    fp32_size = size if opts.quantization == "fp32" else fp32_size  # the stamp adds a few bytes
    metrics.update(size_bytes=size, fp32_size_bytes=fp32_size, compression_vs_fp32=fp32_size / size)
    metadata = {"task": loaded.src.task, "architecture": loaded.src.architecture, "inputs": list(loaded.names),
                "output": loaded.output, "files": [p.name for p in artifact_files(path)], **info}
    _tell(progress, 1.0, "done")
    return ConversionResult(path=path, format="onnx", quantization=opts.quantization, size_bytes=size,
                            metadata=metadata, metrics=metrics, engine_version=ENGINE_VERSION)


def convert_onnx(source: Path, target: TargetSpec, out_dir: Path, *, progress: Progress | None = None,
                 provenance: Mapping[str, str] | None = None) -> ConversionResult:
    """One validated, measured ONNX artifact for `target` in out_dir."""
    if describe(Path(source)).task == "text-generation":
        from .decoder_convert import convert_decoder

        return convert_decoder(Path(source), target, Path(out_dir), progress=progress, provenance=provenance)
    opts = parse_options(target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _tell(progress, 0.0, "loading the PyTorch source")
    loaded = load(Path(source))
    name = (provenance or {}).get("name") or Path(source).name
    path = out_dir / output_filename(name, opts.quantization)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-work-") as tmp:
        work = Path(tmp)
        fp32 = path if opts.quantization == "fp32" else work / "fp32.onnx"
        _tell(progress, 0.1, "exporting to ONNX fp32")
        info = export_optimized(loaded, fp32, opts, work)
        fp32_size = artifact_size(fp32)
        if opts.quantization != "fp32":
            _tell(progress, 0.5, f"quantizing to {opts.quantization}")
            info["quantization"] = _quantize(loaded, fp32, path, opts)
    return finish(loaded, path, opts, info, fp32_size, provenance=provenance, progress=progress)


def quantize_from_fp32(source: Path, fp32_onnx: Path, target: TargetSpec, out_dir: Path, *,
                       progress: Progress | None = None,
                       provenance: Mapping[str, str] | None = None) -> ConversionResult:
    """`target` made from an fp32 ONNX this engine exported from `source`; validated against
    `source` itself (never against the fp32 file), so errors don't compound unseen."""
    if describe(Path(source)).task == "text-generation":
        from .decoder_convert import quantize_decoder_from_fp32

        return quantize_decoder_from_fp32(Path(source), Path(fp32_onnx), target, Path(out_dir), progress=progress,
                                          provenance=provenance)
    opts = parse_options(target)
    if opts.quantization == "fp32":
        raise ValueError("quantize_from_fp32 makes quantized targets; use convert_onnx for fp32")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load(Path(source))
    name = (provenance or {}).get("name") or Path(source).name
    path = out_dir / output_filename(name, opts.quantization)
    _tell(progress, 0.1, f"quantizing to {opts.quantization}")
    info = {"quantization": _quantize(loaded, Path(fp32_onnx), path, opts)}
    return finish(loaded, path, opts, info, artifact_size(fp32_onnx), provenance=provenance, progress=progress)


__all__ = ["convert_onnx", "quantize_from_fp32", "output_filename", "load"]
