"""Hugging Face safetensors -> GGUF: plan the tensors, write them streaming, validate, publish.

The file is written under a hidden temporary name in out_dir, validated there, and only renamed
to its final name once every check passed; any exception (Cancelled included) removes it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import gguf

from ..errors import ResourceExhausted
from ..hf.source import HFModelSource
from ..hf.tensor_reader import read_f32
from ..manifest import ENGINE_VERSION
from ..results import ConversionResult
from ..spec import TargetSpec
from . import llama, policy
from .ggml_types import ALIGNMENT, FILE_TYPES, QUANTIZATION_VERSION
from .validate import validate_gguf
from .vocab import write_vocab
from .writer import TensorPlan, write_gguf

Progress = Callable[[float, str], None]
# Share of the progress bar spent writing; validation (two model loads) takes the rest.
_WRITE_SHARE = 0.8


def plan_tensors(source: HFModelSource, quantization: str) -> list[TensorPlan]:
    """Every output tensor, in a stable order independent of how the source is sharded."""
    namer = llama.TensorNamer(source.config)
    plans = []
    for hf_name, ref in source.tensors.items():
        name = namer.gguf_name(hf_name)
        if name is None:
            continue

        def load(ref=ref, hf_name=hf_name):
            return namer.transform(hf_name, read_f32(ref))

        plans.append(TensorPlan(name, ref.shape, policy.tensor_type(name, ref.shape, quantization), load, hf_name))
    for name, data in llama.extra_tensors(source.config):
        plans.append(TensorPlan(name, data.shape, policy.tensor_type(name, data.shape, quantization),
                                lambda data=data: data))
    return sorted(plans, key=lambda p: llama.tensor_order_key(p.name))


def model_name(source: HFModelSource, provenance: Mapping[str, str]) -> str:
    return str(provenance.get("name") or source.config.get("_name_or_path") or source.name).rsplit("/", 1)[-1]


def output_filename(name: str, quantization: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return f"{safe}-{quantization}.gguf"


def _metadata_writer(source: HFModelSource, quantization: str, provenance: Mapping[str, str]):
    def add(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(model_name(source, provenance))
        w.add_quantized_by("Quantyard")
        w.add_file_type(FILE_TYPES[quantization].llama_ftype)
        w.add_quantization_version(QUANTIZATION_VERSION)
        llama.write_hparams(w, source.config)
        write_vocab(w, source.root, source.config["vocab_size"])
        w.add_string("quantyard.engine_version", ENGINE_VERSION)
        for key, value in sorted(provenance.items()):
            if key != "name":
                w.add_string(f"quantyard.{re.sub(r'[^a-z0-9_]', '_', key.lower())}", str(value))

    return add


def estimate(source: HFModelSource, target: TargetSpec) -> dict[str, int]:
    """Output size and peak memory, from shapes only."""
    plans = plan_tensors(source, target.quantization)
    tensor_bytes = sum(p.nbytes + ALIGNMENT for p in plans)
    # the vocab lands in the metadata about as large as the biggest tokenizer file
    vocab_bytes = max((f.stat().st_size for f in source.root.glob("tokenizer*") if f.is_file()), default=0)
    size = tensor_bytes + vocab_bytes + 4096
    largest = max(math.prod(p.shape) for p in plans) * 4
    # writing: float32 copy + transformed copy + encoded bytes of the largest tensor;
    # validation: transformers in float32 plus llama.cpp's copy of the artifact, side by side.
    writing = 3 * largest + vocab_bytes
    validating = source.parameter_count * 4 + size
    return {"size_bytes": size, "peak_memory_bytes": max(writing, validating), "disk_bytes": size}


@contextlib.contextmanager
def _cleanup_on_error(*paths: Path):
    try:
        yield
    except BaseException:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise


def _report(progress: Progress | None, frac: float, message: str) -> None:
    if progress is not None:
        progress(min(max(frac, 0.0), 1.0), message)


def convert(source: HFModelSource, target: TargetSpec, out_dir: Path, *, progress: Progress | None = None,
            provenance: Mapping[str, str] | None = None) -> ConversionResult:
    provenance = dict(provenance or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / output_filename(model_name(source, provenance), target.quantization)
    tmp = out_dir / f".{final.name}.{uuid.uuid4().hex}.partial"
    plans = plan_tensors(source, target.quantization)
    total_bytes = sum(p.nbytes for p in plans) or 1

    with _cleanup_on_error(tmp):
        _report(progress, 0.0, f"writing {final.name}")
        done = 0

        def on_tensor(i: int, plan: TensorPlan) -> None:
            nonlocal done
            done += plan.nbytes
            _report(progress, _WRITE_SHARE * done / total_bytes, f"wrote {plan.name} ({i + 1}/{len(plans)})")

        try:
            write_gguf(tmp, llama.ARCH_NAME, _metadata_writer(source, target.quantization, provenance),
                       plans, on_tensor)
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise ResourceExhausted(f"out of disk space writing {final.name}") from e
            raise
        _report(progress, _WRITE_SHARE, "validating with llama.cpp and transformers")
        metrics = validate_gguf(tmp, source.root, target.quantization, expected_tensors=len(plans))
        _report(progress, 0.99, "validated")
        os.replace(tmp, final)
    return _result(final, target, source, plans, metrics)


def _result(path: Path, target: TargetSpec, source: HFModelSource, plans: list[TensorPlan],
            metrics: dict) -> ConversionResult:
    types: dict[str, int] = {}
    for p in plans:
        types[p.type_name] = types.get(p.type_name, 0) + 1
    metadata = {
        "architecture": source.architecture,
        "gguf_architecture": llama.ARCH_NAME,
        "tensor_count": len(plans),
        "parameter_count": sum(math.prod(p.shape) for p in plans),
        "file_type": FILE_TYPES[target.quantization].llama_ftype,
        "source_dtype": source.source_dtype,
        "tensor_types": types,
        "filename": path.name,
    }
    return ConversionResult(path=path, format=target.format, quantization=target.quantization,
                            size_bytes=path.stat().st_size, metadata=metadata, metrics=metrics,
                            engine_version=ENGINE_VERSION)


class GGUFConverter:
    """The "gguf" entry of the engine's converter registry."""

    architectures = llama.ARCHITECTURES

    def estimate(self, source: HFModelSource, target: TargetSpec) -> dict[str, int]:
        return estimate(source, target)

    def convert(self, source: HFModelSource, target: TargetSpec, out_dir: Path, *,
                progress: Progress | None = None, provenance: Mapping[str, str] | None = None) -> ConversionResult:
        return convert(source, target, out_dir, progress=progress, provenance=provenance)


__all__ = ["GGUFConverter", "plan_tensors", "estimate", "convert", "output_filename"]
