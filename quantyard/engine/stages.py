"""The stages a conversion is split into, so one job's targets can run as separate tasks:

1. `make_intermediate`: the source, converted once to a lossless GGUF in its own precision.
2. `compute_imatrix` (when a target wants one): importance weights from calibration text.
3. `quantize`: the intermediate (or a GGUF the user gave) to one target with llama.cpp's own
   per-tensor policy and ggml's kernels, validated against the source.

`quantyard convert`, `engine.convert` and the service's workers all go through these, so a file
made locally and one made by the service are the same bytes. Light to import: heavy modules load
inside the functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import cast

from .dominant import dominant_type
from .manifest import ENGINE_VERSION
from .results import ConversionResult, PreflightReport
from .spec import TargetSpec

Progress = Callable[[float, str], None]
LOSSLESS_TYPES = ("F32", "F16", "BF16")
# Share of a quantize stage's progress spent writing; validation (model loads) takes the rest.
_WRITE_SHARE = 0.7


def intermediate_target(report: PreflightReport) -> TargetSpec:
    """The GGUF float type that holds the source without rounding."""
    dtype = report.source_dtype.upper()
    return TargetSpec("gguf", dtype if dtype in LOSSLESS_TYPES else "F32")


def is_direct(target: TargetSpec) -> bool:
    """Made straight from the source: GGUF float types, and every ONNX target (the ONNX engine
    exports and quantizes in one call); other GGUF targets come from the intermediate."""
    return target.format != "gguf" or target.quantization in LOSSLESS_TYPES


def wants_imatrix(target: TargetSpec) -> bool:
    """Imatrix types need one; any other quantized target may ask (params {"imatrix": true})."""
    from .gguf.ggml_types import FILE_TYPES

    if is_direct(target):
        return False
    return bool(target.params.get("imatrix")) or FILE_TYPES[target.quantization].needs_imatrix


def make_intermediate(source_dir: Path, report: PreflightReport, out_dir: Path, *,
                      progress: Progress | None = None,
                      provenance: Mapping[str, str] | None = None) -> ConversionResult:
    from . import convert

    return convert(source_dir, intermediate_target(report), out_dir, progress=progress,
                   provenance=provenance)


def compute_imatrix(source_dir: Path, intermediate: Path, out_path: Path, *,
                    text: str | None = None, progress: Progress | None = None) -> dict:
    """Importance matrix of the source model over calibration text (the shipped default unless
    `text` is given), in llama.cpp's imatrix file format; returns its provenance."""
    from .gguf.gguf_input import GGUFInput
    from .gguf.imatrix import compute_imatrix as _compute

    with GGUFInput(Path(intermediate)) as gguf_in:
        fields = gguf_in.small_fields()
        # our own intermediate: a string and an integer key (gguf_layout decodes them so)
        arch = cast(str, fields["general.architecture"])
        shapes = {name: t.ne for name, t in gguf_in.tensors.items()}
    data = _compute(Path(source_dir), gguf_arch=arch, n_blocks=int(cast(int, fields[f"{arch}.block_count"])),
                    text=text, gguf_tensors=shapes, progress=progress)
    data.save(Path(out_path))
    return data.provenance()


def preflight_gguf(path: Path, targets: Sequence[TargetSpec], *,
                   memory_limit_bytes: int | None = None) -> PreflightReport:
    """Headers only: what the GGUF holds, and each target's size when made from it. With
    `memory_limit_bytes`, a file whose requantization would need more is refused
    (ResourceLimit): llama.cpp maps both files, so the peak is a few copies of one tensor."""
    from .gguf.gguf_input import GGUFInput
    from .gguf.quantize import estimate_size
    from .hf.sanity import require_memory

    with GGUFInput(Path(path)) as gguf_in:
        fields = gguf_in.small_fields()
        count = sum(t.n_elements for t in gguf_in.tensors.values())
        largest = max((t.n_elements for t in gguf_in.tensors.values()), default=0)
        dominant = dominant_type((t.type_name, t.n_elements) for t in gguf_in.tensors.values())
    # requantizing: a float32 copy, a transformed copy and the encoded bytes of one tensor
    estimates = {t.key: {"size_bytes": estimate_size(Path(path), t.quantization, has_imatrix=wants_imatrix(t)),
                         "peak_memory_bytes": 3 * 4 * largest} for t in targets}
    require_memory(estimates, memory_limit_bytes)
    return PreflightReport(architecture=str(fields.get("general.architecture")),
                           parameter_count=count, source_dtype=dominant, estimates=estimates)


def output_filename(name: str, quantization: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return f"{safe}-{quantization}.gguf"


def _gguf_name(path: Path) -> str:
    from .gguf.gguf_input import GGUFInput

    with GGUFInput(path) as gguf_in:
        return str(gguf_in.value("general.name") or path.stem)


def _scaled(progress: Progress | None, start: float, span: float) -> Progress | None:
    if progress is None:
        return None
    return lambda fraction, message: progress(start + span * fraction, message)


def quantize(input_gguf: Path, target: TargetSpec, out_dir: Path, *, reference: Path,
             imatrix: Path | None = None, progress: Progress | None = None,
             provenance: Mapping[str, str] | None = None,
             split_max_bytes: int | None = None, stem: str | None = None) -> ConversionResult:
    """One target from a GGUF, validated against `reference`: the Hugging Face source folder
    (logits vs transformers) or, for a GGUF source, that GGUF (logits vs llama.cpp on it).
    general.name is the input's; the file is `stem`-QUANT.gguf (default: the provenance name,
    else that general.name)."""
    from .gguf.converter import provenance_kv
    from .gguf.quantize import quantize_gguf

    provenance = dict(provenance or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem or provenance.get("name") or _gguf_name(Path(input_gguf))
    report = quantize_gguf(Path(input_gguf), out_dir / output_filename(name, target.quantization),
                           target.quantization, imatrix=imatrix,
                           progress=_scaled(progress, 0.0, _WRITE_SHARE),
                           extra_metadata=provenance_kv(provenance),
                           split_max_bytes=split_max_bytes)
    try:
        if progress is not None:
            progress(_WRITE_SHARE, "validating with llama.cpp against the source")
        metrics = _validate(report.path, Path(reference), target.quantization)
    except BaseException:
        for path in report.paths:
            path.unlink(missing_ok=True)
        raise
    metrics.update({"bits_per_weight": round(report.bits_per_weight, 4),
                    "size_bytes": report.size_bytes})
    metadata = {"file_type": report.file_type, "parameter_count": report.parameter_count,
                "tensor_count": report.tensor_count, "tensor_types": report.tensor_types,
                "requantized_from": report.requantized_from, "fallbacks": report.fallbacks,
                "imatrix": report.imatrix, "files": [p.name for p in report.paths],
                "filename": report.path.name}
    return ConversionResult(path=report.path, format="gguf", quantization=target.quantization,
                            size_bytes=report.size_bytes, metadata=metadata, metrics=metrics,
                            engine_version=ENGINE_VERSION)


def _validate(path: Path, reference: Path, quantization: str) -> dict:
    from .gguf.quality import BOUNDS
    from .gguf.validate import validate_gguf

    bounds = BOUNDS[quantization]
    if reference.is_dir():
        return validate_gguf(path, reference, quantization, max_mean_kl=bounds.max_mean_kl,
                             min_top1=bounds.min_top1)
    return _validate_against_gguf(path, reference, quantization)


def _validate_against_gguf(path: Path, reference: Path, quantization: str) -> dict:
    """A requantized file is held to its input: same tokens, logits within the type's bounds."""
    from .errors import ValidationFailed
    from .gguf.quality import check_quality, logit_metrics
    from .gguf.validate import PROBE_TEXT, llama_reference

    ref_ids, ref_logits = llama_reference(reference, PROBE_TEXT, 256)
    ids, logits = llama_reference(path, PROBE_TEXT, 256)
    if ids != ref_ids:
        raise ValidationFailed("the output tokenizes the probe text differently from its input",
                               details={"input_ids": ref_ids, "output_ids": ids})
    metrics = check_quality(quantization, logit_metrics(ref_logits, logits))
    return {**metrics, "reference": "input-gguf", "probe_tokens": len(ids)}


def convert_many(source_dir: Path, targets: Sequence[TargetSpec], out_dir: Path, *,
                 progress_for: Callable[[TargetSpec], Progress | None] = lambda t: None,
                 provenance: Mapping[str, str] | None = None,
                 imatrix: Path | None = None,
                 calibration_text: str | None = None,
                 split_max_bytes: int | None = None,
                 stem: str | None = None) -> list[ConversionResult]:
    """Several targets from one Hugging Face source, reading and converting it once: float
    targets straight from the source, the rest from one shared intermediate (and one shared
    importance matrix when any target wants it). Every artifact is validated.

    general.name is provenance["name"] when the caller gives one (convert_hf_to_gguf.py's
    --model-name), else what llama.cpp derives; files are named `stem`-QUANT (default:
    converter.model_name) either way."""
    import tempfile

    from . import _load, _program_targets, convert, parse_target
    from .gguf.converter import convert as convert_float
    from .gguf.converter import model_name, write_float_gguf

    targets = [parse_target(t) for t in targets]
    provenance = dict(provenance or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf = [t for t in targets if t.format == "gguf"]
    if gguf:
        _program_targets(Path(source_dir), gguf)  # refuses GGUF targets of a program source
        source, _ = _load(Path(source_dir), gguf)
        gguf_stem = stem or model_name(source, provenance)
    # ONNX files keep their name in their own metadata (quantyard.name), as they always have
    named = {**provenance, "name": stem} if stem else provenance
    results = []
    for t in (t for t in targets if is_direct(t)):
        if t.format == "gguf":
            results.append(convert_float(source, t, out_dir, progress=progress_for(t), provenance=provenance,
                                         stem=gguf_stem))
        else:
            results.append(convert(source_dir, t, out_dir, progress=progress_for(t), provenance=named))
    quantized = [t for t in targets if not is_direct(t)]
    if not quantized:
        return results
    dtype = source.source_dtype.upper()
    with tempfile.TemporaryDirectory(prefix="qy-intermediate-", dir=out_dir) as tmp:
        intermediate = Path(tmp) / "intermediate.gguf"
        write_float_gguf(source, intermediate, dtype if dtype in LOSSLESS_TYPES else "F32",
                         provenance=provenance, progress=progress_for(quantized[0]))
        # An imatrix the user gives applies to every quantized target (as llama-quantize
        # --imatrix does); one we compute, only to the targets that want it.
        given = imatrix
        if given is None and any(wants_imatrix(t) for t in quantized):
            imatrix = Path(tmp) / "imatrix.gguf"
            compute_imatrix(source.root, intermediate, imatrix, text=calibration_text,
                            progress=progress_for(quantized[0]))
        for t in quantized:
            use = given if given is not None else (imatrix if wants_imatrix(t) else None)
            results.append(quantize(intermediate, t, out_dir, reference=source.root, imatrix=use,
                                    progress=progress_for(t), provenance=provenance,
                                    split_max_bytes=split_max_bytes, stem=gguf_stem))
    return results


def convert_via_intermediate(source, target: TargetSpec, out_dir: Path, *,
                             progress: Progress | None = None,
                             provenance: Mapping[str, str] | None = None,
                             imatrix: Path | None = None) -> ConversionResult:
    """A quantized target from a Hugging Face source in one call (what `engine.convert` does for
    anything but float types): unvalidated lossless intermediate in a temporary folder, then
    `quantize` (validated against the source)."""
    import tempfile

    from .gguf.converter import model_name, write_float_gguf

    dtype = source.source_dtype.upper()
    outtype = dtype if dtype in LOSSLESS_TYPES else "F32"
    provenance = dict(provenance or {})  # general.name: the caller's, else llama.cpp's derivation
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qy-intermediate-", dir=out_dir) as tmp:
        intermediate = Path(tmp) / f"intermediate-{outtype}.gguf"
        write_float_gguf(source, intermediate, outtype, provenance=provenance,
                         progress=_scaled(progress, 0.0, 0.3))
        if imatrix is None and wants_imatrix(target):
            imatrix = Path(tmp) / "imatrix.gguf"  # computed from the shipped calibration text
            compute_imatrix(source.root, intermediate, imatrix,
                            progress=_scaled(progress, 0.3, 0.2))
        return quantize(intermediate, target, out_dir, reference=source.root, imatrix=imatrix,
                        progress=_scaled(progress, 0.5, 0.5), provenance=provenance,
                        stem=model_name(source, provenance))
