"""The ONNX conversion of a text-generation decoder (LlamaForCausalLM, GPT2LMHeadModel,
Qwen2ForCausalLM): load once, export fp32 with past key/values, quantize, validate against
transformers (prefill logits + greedy generation), measure generation speed.

convert.py hands a source here when its task is "text-generation"; `quantize_decoder_from_fp32`
starts from an fp32 artifact already made for the same source, so one job's targets share one
export. Either way the artifact is validated against the PyTorch source, never the fp32 file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..manifest import ENGINE_VERSION
from ..results import ConversionResult
from ..spec import TargetSpec
from .decoder_options import DecoderOptions, parse_decoder_options
from .modelio import artifact_files, artifact_size, finalize
from .samples import DECODER_LATENCY_PROMPT, DECODER_PROMPTS
from .source import EncoderSource, describe, load_pickled_state_dict

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class LoadedDecoder:
    """The PyTorch source, loaded once per conversion."""

    src: EncoderSource
    model: Any  # a transformers PreTrainedModel, fp32, in eval mode
    tokenizer: Any


def load_decoder(source: Path) -> LoadedDecoder:
    """fp32, eager attention (the exporter traces it: sdpa's fast paths branch on shapes);
    pickled weights only through the weights-only loader; either way proven to be the upload's
    weights (engine/hf/strict_load.py)."""
    import transformers
    from transformers import AutoTokenizer

    from ..hf.strict_load import load_pretrained, load_state_dict_strict

    src = describe(source)
    cls = getattr(transformers, src.architecture)
    if src.weights == "safetensors":
        model = load_pretrained(cls, src.root, attn_implementation="eager")
    else:
        config = cls.config_class.from_pretrained(src.root)
        config._attn_implementation = "eager"
        model = load_state_dict_strict(cls(config), load_pickled_state_dict(src.root / src.weights), src.weights)
    return LoadedDecoder(src, model.float().eval(), AutoTokenizer.from_pretrained(src.root))


def _tell(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)  # may raise Cancelled: that is how a job stops


def _quantize(fp32: Path, dst: Path, opts: DecoderOptions) -> dict:
    from .decoder_quantize import DECODER_QUANTIZERS
    from .modelio import consolidate

    info = DECODER_QUANTIZERS[opts.quantization](fp32, dst, opts)
    consolidate(dst)
    return info


def _graph_io(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    types = {1: "float32", 10: "float16", 7: "int64"}

    def io(values):
        return [{"name": v.name, "dtype": types.get(v.type.tensor_type.elem_type, "other"),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values]

    return {"inputs": io(model.graph.input), "outputs": io(model.graph.output),
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)}


def _check_and_measure(loaded: LoadedDecoder, path: Path, opts: DecoderOptions,
                       progress: Progress | None) -> dict:
    from .decoder_measure import measure_generation
    from .decoder_validate import torch_reference, validate_decoder

    _tell(progress, 0.7, "generating with transformers (the reference)")
    ref = torch_reference(loaded.model, loaded.tokenizer, DECODER_PROMPTS, opts.new_tokens)
    _tell(progress, 0.8, "validating prefill logits and greedy generation against PyTorch")
    metrics = validate_decoder(path, ref, opts.tolerances)
    _tell(progress, 0.9, "timing generation")
    metrics.update(measure_generation(path, loaded.tokenizer, DECODER_LATENCY_PROMPT, new_tokens=opts.new_tokens))
    return metrics


def _finish(loaded: LoadedDecoder, path: Path, opts: DecoderOptions, info: dict, fp32_size: int, *,
            provenance: Mapping[str, str] | None, progress: Progress | None) -> ConversionResult:
    from .convert import _stamp
    from .decoder import cache_shape

    _stamp(path, provenance, opts)
    finalize(path, external_data=opts.external_data)  # validated as it ships
    metrics = _check_and_measure(loaded, path, opts, progress)
    size = artifact_size(path)
    fp32_size = size if opts.quantization == "fp32" else fp32_size  # the stamp adds a few bytes
    metrics.update(size_bytes=size, fp32_size_bytes=fp32_size, compression_vs_fp32=fp32_size / size)
    layers, kv_heads, head_dim = cache_shape(loaded.model.config)
    io = _graph_io(path)
    metadata = {"task": loaded.src.task, "architecture": loaded.src.architecture,
                "inputs": [i["name"] for i in io["inputs"]], "outputs": [o["name"] for o in io["outputs"]],
                "io": io["inputs"] + io["outputs"], "opset": io["opset"], "layers": layers,
                "kv_heads": kv_heads, "head_dim": head_dim, "vocab_size": int(loaded.model.config.vocab_size),
                "files": [p.name for p in artifact_files(path)],
                "generation": "greedy loop over the past/present key-values (Optimum names)", **info}
    _tell(progress, 1.0, "done")
    return ConversionResult(path=path, format="onnx", quantization=opts.quantization, size_bytes=size,
                            metadata=metadata, metrics=metrics, engine_version=ENGINE_VERSION)


def convert_decoder(source: Path, target: TargetSpec, out_dir: Path, *, progress: Progress | None = None,
                    provenance: Mapping[str, str] | None = None) -> ConversionResult:
    """One validated, measured decoder ONNX for `target` in out_dir."""
    from .convert import output_filename
    from .decoder import export_decoder

    opts = parse_decoder_options(target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _tell(progress, 0.0, "loading the PyTorch source")
    loaded = load_decoder(Path(source))
    name = (provenance or {}).get("name") or Path(source).name
    path = out_dir / output_filename(name, opts.quantization)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-work-") as tmp:
        fp32 = path if opts.quantization == "fp32" else Path(tmp) / "fp32.onnx"
        _tell(progress, 0.1, "exporting the decoder with past key/values to ONNX fp32")
        info = export_decoder(loaded.model, fp32, opset=opts.opset)
        info = {"exporter": info["exporter"], "export_check_max_abs_diff": info["check_max_abs_diff"],
                "export_check_relative_diff": info["check_relative_diff"]}
        fp32_size = artifact_size(fp32)
        if opts.quantization != "fp32":
            _tell(progress, 0.5, f"quantizing to {opts.quantization}")
            info["quantization"] = _quantize(fp32, path, opts)
    return _finish(loaded, path, opts, info, fp32_size, provenance=provenance, progress=progress)


def quantize_decoder_from_fp32(source: Path, fp32_onnx: Path, target: TargetSpec, out_dir: Path, *,
                               progress: Progress | None = None,
                               provenance: Mapping[str, str] | None = None) -> ConversionResult:
    """`target` made from a decoder fp32 ONNX this engine exported from `source`."""
    from .convert import output_filename

    opts = parse_decoder_options(target)
    if opts.quantization == "fp32":
        raise ValueError("quantize_from_fp32 makes quantized targets; use convert_onnx for fp32")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _tell(progress, 0.0, "loading the PyTorch source")
    loaded = load_decoder(Path(source))
    name = (provenance or {}).get("name") or Path(source).name
    path = out_dir / output_filename(name, opts.quantization)
    _tell(progress, 0.1, f"quantizing to {opts.quantization}")
    info = {"exporter": _graph_io(Path(fp32_onnx))["producer"], "quantization": _quantize(Path(fp32_onnx), path, opts)}
    return _finish(loaded, path, opts, info, artifact_size(fp32_onnx), provenance=provenance, progress=progress)


__all__ = ["LoadedDecoder", "convert_decoder", "load_decoder", "quantize_decoder_from_fp32"]
