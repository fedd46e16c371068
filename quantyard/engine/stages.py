"""The stages a conversion is split into, and the executor of the conversion plan (plan.py):

1. `make_reference`: the source model's outputs on the probe text, once per source.
2. `run_source_pass`: ONE read of the source writes the lossless intermediate GGUF and every
   float GGUF target (converter.write_float_ggufs), validated against those outputs.
3. `compute_imatrix` (when a target wants one): importance weights from calibration text.
4. `run_target_step` → `quantize`: the intermediate (or a GGUF the user gave) to one target
   with llama.cpp's own per-tensor policy and ggml's kernels, validated against the source's
   reference outputs; ONNX targets from the shared fp32 export or the source.

`quantyard convert` runs a whole plan with `execute_plan` (convert_many); the service's workers
run the same steps with the same functions, the shared ones in the prepare task and each target
step in its own task, so a file made locally and one made by the service are the same bytes.
Light to import: heavy modules load inside the functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from .digest import file_sha256
from .dominant import dominant_type
from .heap import trim_heap
from .manifest import ENGINE_VERSION
from .plan import LOSSLESS_TYPES, ConversionPlan, Step, plan_conversion
from .plan import wants_imatrix as _plan_wants_imatrix
from .results import ConversionResult, PreflightReport
from .spec import TargetSpec

if TYPE_CHECKING:
    from .evaluation import EvalReference
    from .frontier import FrontierPoint
    from .gguf.reference import ReferenceOutputs

Progress = Callable[[float, str], None]
# Shares of a quantize stage's progress: writing, then validation (model loads) until
# _EVAL_START, then the quality report on the evaluation text ("evaluate").
_WRITE_SHARE = 0.6
_EVAL_START = 0.75
# The plan's source digest when the caller has none (quantyard convert on a folder): its files
# then carry no source digest nor recipe hash, as they never did.
UNKNOWN_SOURCE = "0" * 64
REFERENCE_FILE = "reference.safetensors"
# The source's outputs on the evaluation text (issue 13), stored beside REFERENCE_FILE.
EVAL_REFERENCE_FILE = "evaluation.safetensors"
# How many chunks of the evaluation text a quality report scores when the caller does not say
# (Settings.evaluation_chunks): 16 x 512 tokens = 4,080 scored tokens, 78x the old 52-token
# probe, about 20 s per SmolLM2 artifact on 2 cores; the whole shipped text is 54 chunks.
DEFAULT_EVALUATION_CHUNKS = 16
# What a step is given to evaluate a GGUF with: the target's spec -> the reference for its text.
EvaluationFor = Callable[[TargetSpec], "EvalReference | None"]
# The phases a step's progress messages announce, by the message's first word (the messages
# below are written so): the worker times each phase (quantyard_stage_duration_seconds).
_PHASE_WORDS = {"validating": "validate", "evaluate:": "evaluate", "auto:": "search"}


def phase_of(message: str, default: str) -> str:
    """The phase of a step that a progress message of this module's steps belongs to:
    "validate", "evaluate", "search" (gguf:auto's candidates), else `default` (the step's
    own work: writing the intermediate, quantizing, exporting)."""
    return _PHASE_WORDS.get(message.split(" ", 1)[0], default)


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
    return _plan_wants_imatrix(target)


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
             split_max_bytes: int | None = None, stem: str | None = None,
             outputs: ReferenceOutputs | None = None,
             evaluation: EvalReference | None = None,
             known: Mapping[str, FrontierPoint] | None = None) -> ConversionResult:
    """One target from a GGUF, validated against `reference`: the Hugging Face source folder
    (logits vs transformers, or vs `outputs`, the source's reference outputs computed once) or,
    for a GGUF source, that GGUF (logits vs llama.cpp on it).
    general.name is the input's; the file is `stem`-QUANT.gguf (default: the provenance name,
    else that general.name). With `evaluation` the file gets its quality report
    (metrics["quality"]); a target's params.gates are held to it (GateFailed: no file kept).
    gguf:auto reuses `known` preset measurements of this source instead of making them again."""
    from .gguf.converter import provenance_kv
    from .gguf.quantize import quantize_gguf

    provenance = dict(provenance or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem or provenance.get("name") or _gguf_name(Path(input_gguf))
    quantization, tensor_types, auto = target.quantization, target.params.get("tensor_types"), None
    if quantization == "auto":  # measure candidates, then write the winner like any target
        from .gguf.auto_step import choose_auto

        auto = choose_auto(Path(input_gguf), target, out_dir / ".auto", evaluation=evaluation, imatrix=imatrix,
                           extra_metadata=provenance_kv(provenance), known=known,
                           progress=_scaled(progress, 0.0, _WRITE_SHARE))
        quantization, tensor_types = auto.winner_quantization, auto.winner_overrides
    trim_heap()  # what earlier stages freed, before this write's peak (heap.py)
    report = quantize_gguf(Path(input_gguf), out_dir / output_filename(name, target.quantization),
                           quantization, imatrix=imatrix,
                           progress=None if auto else _scaled(progress, 0.0, _WRITE_SHARE),
                           extra_metadata=provenance_kv(provenance),
                           split_max_bytes=split_max_bytes,
                           tensor_types=tensor_types)  # llama-quantize --tensor-type
    try:
        if progress is not None:
            progress(_WRITE_SHARE, "validating with llama.cpp against the source")
        metrics = _validate(report.path, Path(reference), quantization, outputs)
        metrics.update(evaluate(report.path, target, evaluation, progress=_scaled(progress, _EVAL_START,
                                                                                    1 - _EVAL_START)))
    except BaseException:
        for path in report.paths:
            path.unlink(missing_ok=True)
        raise
    metrics.update({"bits_per_weight": round(report.bits_per_weight, 4),
                    "size_bytes": report.size_bytes})
    if auto is not None:  # the whole frontier goes into the artifact and the job result
        metrics["auto"] = auto.to_dict()
    metadata = {"file_type": report.file_type, "parameter_count": report.parameter_count,
                "tensor_count": report.tensor_count, "tensor_types": report.tensor_types,
                "requantized_from": report.requantized_from, "fallbacks": report.fallbacks,
                "imatrix": report.imatrix, "files": [p.name for p in report.paths],
                "filename": report.path.name}
    return ConversionResult(path=report.path, format="gguf", quantization=target.quantization,
                            size_bytes=report.size_bytes, metadata=metadata, metrics=metrics,
                            engine_version=ENGINE_VERSION)


def _validate(path: Path, reference: Path, quantization: str, outputs: ReferenceOutputs | None = None) -> dict:
    from .gguf.quality import BOUNDS
    from .gguf.validate import validate_gguf

    bounds = BOUNDS[quantization]
    if reference.is_dir():
        return validate_gguf(path, reference, quantization, max_mean_kl=bounds.max_mean_kl,
                             min_top1=bounds.min_top1, reference=outputs)
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


def evaluation_text(spec: TargetSpec, default: str | None = None) -> str | None:
    """The text a target is evaluated on: its params.evaluation_text, else `default` (the CLI's
    --evaluation file), else None (the shipped evaluation text)."""
    return spec.params.get("evaluation_text") or default


def eval_reference_filename(text: str | None, chunks: int | None = DEFAULT_EVALUATION_CHUNKS) -> str:
    """Where the source's reference on `text` is stored (beside the intermediate): one file per
    distinct evaluation text and extent (None: every chunk of the text)."""
    extent = "" if chunks == DEFAULT_EVALUATION_CHUNKS else f"-c{chunks or 'all'}"
    if text is None:
        return EVAL_REFERENCE_FILE.replace(".safetensors", f"{extent}.safetensors")
    from .evaluation.text import text_sha256

    return f"evaluation-{text_sha256(text)[:16]}{extent}.safetensors"


def make_eval_reference(source: Path, out_path: Path | None = None, *, text: str | None = None,
                        source_format: str = "hf", chunks: int | None = DEFAULT_EVALUATION_CHUNKS,
                        progress: Progress | None = None) -> EvalReference:
    """The source's outputs on the first `chunks` chunks of the evaluation text (None: all of it;
    transformers on a Hugging Face folder, llama.cpp on a GGUF source, like llama-perplexity
    --kl-divergence-base), saved to `out_path`."""
    from .evaluation import compute_eval_reference, gguf_eval_reference

    compute = gguf_eval_reference if source_format == "gguf" else compute_eval_reference
    ref = compute(Path(source), text=text, max_chunks=chunks, progress=progress)
    if out_path is not None:
        ref.save(Path(out_path))
    return ref


def evaluate(path: Path, target: TargetSpec, evaluation: EvalReference | None, *,
             progress: Progress | None = None) -> dict:
    """{"quality": report} for a GGUF evaluated against the source's reference (none without
    one), after which the target's gates are checked: a gate with nothing measured fails."""
    from .gates import check_gates, target_gates

    metrics = {}
    if evaluation is not None:
        from .evaluation import evaluate_gguf

        if progress is not None:
            progress(0.0, "evaluate: quality report on the evaluation text")
        report = evaluate_gguf(Path(path), evaluation,
                               progress=None if progress is None else
                               lambda f, m: progress(f, f"evaluate: {m}"))
        metrics["quality"] = report.to_dict()
    check_gates(target_gates(target.params, fmt=target.format), metrics.get("quality"), target=target.key)
    return metrics


def cached_evaluations(make: Callable[[str | None], EvalReference], default: str | None = None) -> EvaluationFor:
    """evaluation_for: a target's reference, made once per distinct evaluation text by `make`."""
    made: dict[str | None, EvalReference] = {}

    def evaluation_for(spec: TargetSpec) -> EvalReference | None:
        if spec.format != "gguf":
            return None
        text = evaluation_text(spec, default)
        if text not in made:
            made[text] = make(text)
        return made[text]

    return evaluation_for


def convert_many(source_dir: Path, targets: Sequence[TargetSpec], out_dir: Path, *,
                 report: PreflightReport | None = None,
                 progress_for: Callable[[TargetSpec], Progress | None] = lambda t: None,
                 provenance: Mapping[str, str] | None = None,
                 imatrix: Path | None = None,
                 calibration_text: str | None = None,
                 split_max_bytes: int | None = None,
                 stem: str | None = None,
                 source_sha256: str | None = None,
                 evaluation_text: str | None = None,
                 evaluation_chunks: int | None = DEFAULT_EVALUATION_CHUNKS,
                 evaluate: bool = True) -> list[ConversionResult]:
    """Several targets from one source, in the order asked, by the conversion plan
    (engine/plan.py) the service runs too: one read of the source for every float target and
    the lossless intermediate, the rest quantized from it, one shared importance matrix per
    calibration text, the reference outputs computed once. Every target is validated.

    general.name is provenance["name"] when the caller gives one (convert_hf_to_gguf.py's
    --model-name), else what llama.cpp derives; files are named `stem`-QUANT (default:
    converter.model_name) either way. With `source_sha256` (the service's digest of the source
    upload) the files carry it and their recipe hashes exactly as the service's do. Every GGUF
    target gets its quality report on `evaluation_text` (a target's params.evaluation_text wins;
    default: the shipped text) and is held to its params.gates."""
    from . import _program_targets, parse_target, preflight

    targets = [parse_target(t) for t in targets]
    source_dir = Path(source_dir)
    fmt = source_format(source_dir)
    if report is None and fmt == "hf" and any(t.format == "gguf" for t in targets):
        report = preflight(source_dir, targets)  # also refuses what cannot be converted, early
    elif fmt == "program":
        _program_targets(source_dir, targets)  # refuses GGUF targets of a program source
    plan = plan_for_source(source_dir, targets, report=report, source_format=fmt,
                           source_sha256=source_sha256 or UNKNOWN_SOURCE,
                           calibration_text=calibration_text, given_imatrix=imatrix is not None)
    by_step = {step: progress_for(t) for step, t in zip(plan.targets, targets, strict=True)}
    return execute_plan(plan, source_dir, out_dir, name=(provenance or {}).get("name"), stem=stem,
                        given_imatrix=imatrix, calibration_text=calibration_text,
                        split_max_bytes=split_max_bytes, stamp=source_sha256 is not None,
                        progress_for=lambda step: by_step.get(step.id), provenance=provenance,
                        evaluation_text=evaluation_text, evaluation_chunks=evaluation_chunks, evaluate=evaluate)


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


# ---------------------------------------------------------------- the plan, executed


def source_format(source: Path) -> str:
    """"gguf" for a .gguf file, "program" for a program source folder, else "hf"."""
    from .onnx.program_files import is_program_dir

    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".gguf":
        return "gguf"
    return "program" if is_program_dir(source) else "hf"


def plan_for_source(source: Path, targets: Sequence[TargetSpec], *, report: PreflightReport | None,
                    source_sha256: str, source_format: str = "hf", calibration_text: str | None = None,
                    given_imatrix: bool = False) -> ConversionPlan:
    """plan_conversion with what only the source can tell: its float type (from `report`, the
    preflight) and the fp32 ONNX export each ONNX target can be made from."""
    from . import onnx_fp32_spec

    exports = [onnx_fp32_spec(Path(source), t) if source_format == "hf" else None for t in targets]
    return plan_conversion(source_sha256=source_sha256, targets=targets, source_format=source_format,
                           source_dtype=report.source_dtype if report is not None else "F32",
                           onnx_exports=exports, calibration_text=calibration_text,
                           given_imatrix=given_imatrix)


def calibration_for(plan: ConversionPlan, step: Step, default: str | None = None) -> str | None:
    """The calibration text an imatrix step was planned for: a target's params.calibration_text
    or `default` whose digest it names (None: the shipped text)."""
    from .plan import imatrix_spec

    for text in [*(s.spec.params.get("calibration_text") for s in plan.steps if s.kind == "target"), default]:
        if text and imatrix_spec(text) == step.spec:
            return text
    return None


def step_provenance(*, source_sha256: str, name: str | None, stamp: bool, digest: str | None = None,
                    extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a file records of where it came from: the caller's entries, the model name, and
    (`stamp`: the service, or a caller that knows the source upload's digest) the source digest
    and the step's recipe hash (`digest`; None for files one pass writes together)."""
    provenance = dict(extra or {})
    if name:
        provenance["name"] = name
    if stamp:
        provenance["source_sha256"] = source_sha256
        if digest:
            provenance["recipe_hash"] = digest
    return provenance


def imatrix_filename(step: Step) -> str:
    """An imatrix step's file name, the same wherever the plan runs: the quantized file records
    it (quantize.imatrix.file, as llama-quantize does), so it is part of the target's bytes."""
    return f"imatrix-{step.spec.params['calibration'][:16]}.gguf"


def make_reference(source_dir: Path, out_path: Path | None = None, *,
                   progress: Progress | None = None) -> ReferenceOutputs:
    """The reference step: the source's outputs on the probe text (saved to `out_path`)."""
    from .gguf.reference import compute_reference

    outputs = compute_reference(Path(source_dir), progress=progress)
    trim_heap()  # the source model's float32 weights are gone: hand their pages back
    if out_path is not None:
        outputs.save(Path(out_path))
    return outputs


def run_source_pass(source_dir: Path, plan: ConversionPlan, steps: Sequence[Step], out_dir: Path, *,
                    provenance: Mapping[str, str], validate: Sequence[str], stem: str | None,
                    outputs: ReferenceOutputs | None, progress: Progress | None = None,
                    evaluation_for: EvaluationFor | None = None) -> dict[str, ConversionResult]:
    """The float GGUF steps (intermediate, float targets) written in ONE read of the source;
    the steps named in `validate` are validated (against `outputs`), the others (an
    intermediate only the CLI uses) are not; those that are targets are also evaluated
    (`evaluation_for`, their quality report) and held to their gates. Returns {step id: result}."""
    from . import _load
    from .gguf.converter import model_name, output_filename, write_float_ggufs

    source, _ = _load(Path(source_dir), [s.spec for s in steps])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem or model_name(source, provenance)
    taken = {s.spec.quantization for s in steps if s.kind == "target"}
    paths = {s.id: out_dir / (output_filename(name, s.spec.quantization) if s.kind == "target"
                              or s.spec.quantization not in taken
                              else output_filename(f"{name}-intermediate", s.spec.quantization)) for s in steps}
    plans = write_float_ggufs(source, [(paths[s.id], s.spec.quantization) for s in steps],
                              provenance=provenance, progress=_scaled(progress, 0.0, 0.6))
    trim_heap()  # the pass's tensors, before validation loads each file in llama.cpp (heap.py)
    results = {}
    try:
        for i, (step, tensors) in enumerate(zip(steps, plans, strict=True)):
            if progress is not None:
                progress(0.6 + 0.4 * i / len(steps), f"validating {paths[step.id].name}")
            results[step.id] = _float_result(source, step, paths[step.id], tensors,
                                             outputs if step.id in validate else None, step.id in validate)
            if step.id in validate:
                evaluation = evaluation_for(step.spec) if evaluation_for is not None else None
                results[step.id].metrics.update(evaluate(paths[step.id], step.spec, evaluation, progress=_scaled(
                    progress, 0.6 + 0.4 * (i + 0.5) / len(steps), 0.2 / len(steps))))
    except BaseException:
        for path in paths.values():
            path.unlink(missing_ok=True)
        raise
    return results


def _float_result(source, step: Step, path: Path, tensors, outputs, validate: bool) -> ConversionResult:
    from .gguf import converter
    from .gguf.validate import validate_gguf

    metrics = (validate_gguf(path, source.root, step.spec.quantization, expected_tensors=len(tensors),
                             reference=outputs) if validate else {})
    arch = converter.architecture(source)
    # the vocabulary the pass wrote (remembered by the converter: not built again)
    return converter.float_result(path, step.spec, source, arch, tensors, metrics,
                                  converter.vocab_for(source, arch).info)


def run_target_step(step: Step, source: Path, out_dir: Path, *, source_format: str,
                    files: Mapping[str, Path], outputs: ReferenceOutputs | None,
                    provenance: Mapping[str, str], stem: str | None = None,
                    split_max_bytes: int | None = None, progress: Progress | None = None,
                    evaluation: EvalReference | None = None,
                    evaluation_chunks: int | None = DEFAULT_EVALUATION_CHUNKS,
                    known: Mapping[str, FrontierPoint] | None = None, evaluate: bool = True) -> ConversionResult:
    """One target step that is not part of the source pass, from the files of its input steps
    ({input step id: path}): quantized from the intermediate (or, for a GGUF source, from the
    source itself), from the shared ONNX export, or converted straight from the source (also a
    target whose shared step's artifact was withdrawn before it could be given to it).
    A GGUF target is evaluated against `evaluation` (a GGUF source's is computed from it when
    not given) and held to its gates; a gguf:auto one reuses the `known` preset points. An ONNX
    target gets its report too (evaluate_onnx). `evaluate=False`: no report is made here."""
    from . import convert, quantize_onnx

    spec = step.spec
    if spec.format == "gguf" and source_format == "gguf":
        if evaluation is None and evaluate:  # the source GGUF is the base, as llama-perplexity's KL base file
            evaluation = make_eval_reference(Path(source), text=evaluation_text(spec), source_format="gguf",
                                             chunks=evaluation_chunks)
        return quantize(Path(source), spec, out_dir, reference=Path(source), progress=progress,
                        provenance=provenance, split_max_bytes=split_max_bytes, stem=stem, evaluation=evaluation)
    if spec.format == "gguf" and step.input_of("intermediate"):
        imatrix = step.input_of("imatrix")
        return quantize(files["intermediate"], spec, out_dir, reference=Path(source),
                        imatrix=files[imatrix] if imatrix else None, progress=progress,
                        provenance=provenance, split_max_bytes=split_max_bytes, stem=stem, outputs=outputs,
                        evaluation=evaluation, known=known)
    export = step.input_of("onnx_fp32")
    if export is not None:  # validated against the source, not the fp32 file
        result = quantize_onnx(Path(source), files[export], spec, out_dir, progress=progress, provenance=provenance)
    else:
        result = convert(Path(source), spec, out_dir, progress=progress, provenance=provenance)
    if result.format == "onnx" and source_format == "hf" and step.kind == "target" and evaluate:
        result.metrics.update(evaluate_onnx(result, Path(source), spec, evaluation, chunks=evaluation_chunks))
    return result


def evaluate_onnx(result: ConversionResult, source: Path, spec: TargetSpec, evaluation: EvalReference | None, *,
                  chunks: int | None = DEFAULT_EVALUATION_CHUNKS) -> dict:
    """An ONNX artifact's quality beyond its validation: a decoder gets the GGUF's report
    ({"quality": ...}, onnxruntime against the source's reference on the evaluation text, made
    here when not given), an encoder the held-apart sentences ({"heldout": ...}: PyTorch vs
    onnxruntime on sentences no conversion step saw)."""
    from .onnx.evaluate import evaluate_onnx_decoder, evaluate_onnx_encoder

    if result.metadata.get("task") == "text-generation":
        if evaluation is None:
            evaluation = make_eval_reference(source, text=evaluation_text(spec), chunks=chunks)
        return {"quality": evaluate_onnx_decoder(result.path, evaluation).to_dict()}
    return {"heldout": evaluate_onnx_encoder(result.path, source)}


def execute_plan(plan: ConversionPlan, source: Path, out_dir: Path, *, name: str | None = None,
                 stem: str | None = None, given_imatrix: Path | None = None,
                 calibration_text: str | None = None, split_max_bytes: int | None = None,
                 stamp: bool = False, provenance: Mapping[str, str] | None = None,
                 progress_for: Callable[[Step], Progress | None] = lambda step: None,
                 evaluation_text: str | None = None,
                 evaluation_chunks: int | None = DEFAULT_EVALUATION_CHUNKS,
                 evaluate: bool = True) -> list[ConversionResult]:
    """Run a whole plan in this process (quantyard convert): shared files in a temporary
    folder, the targets' files in out_dir; returns one result per target, in order. Without
    `evaluate` no quality report is measured (validation still runs; gates then fail)."""
    import tempfile

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {k: v for k, v in (provenance or {}).items() if k != "name"}
    done: dict[str, ConversionResult] = {}
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="qy-plan-", dir=out_dir) as tmp:
        outputs = None
        if any(s.kind == "reference" for s in plan.steps):
            outputs = make_reference(Path(source))
        evaluation_for = cached_evaluations(  # the source's reference once per evaluation text
            lambda text: make_eval_reference(Path(source), text=text, source_format=plan.source_format,
                                             chunks=evaluation_chunks),
            evaluation_text) if evaluate else None
        pass_steps = plan.source_pass()
        if pass_steps:
            first = next((progress_for(s) for s in pass_steps if s.id in plan.targets), None)
            shared = step_provenance(source_sha256=plan.source_sha256, name=name, stamp=stamp, extra=extra)
            made = run_source_pass(Path(source), plan, pass_steps, Path(tmp), stem=stem, outputs=outputs,
                                   provenance=shared,
                                   validate=[s.id for s in pass_steps if s.id in plan.targets], progress=first,
                                   evaluation_for=evaluation_for)
            done.update(made)
            files.update({k: r.path for k, r in made.items()})
        for step in plan.steps:
            if step.id in done:
                continue
            if step.id == "imatrix:given" and given_imatrix is not None:
                files[step.id] = Path(given_imatrix)
            elif step.kind == "imatrix":
                files[step.id] = Path(tmp) / imatrix_filename(step)
                compute_imatrix(Path(source), files["intermediate"], files[step.id],
                                text=calibration_for(plan, step, calibration_text))
            elif step.kind in ("onnx_fp32", "target"):
                digests = {i: file_sha256(files[i]) for i in step.inputs if i in files} if stamp else {}
                digest = step.artifact_recipe(digests)[1]
                prov = step_provenance(source_sha256=plan.source_sha256, name=name, stamp=stamp, digest=digest,
                                       extra=extra)
                done[step.id] = run_target_step(
                    step, Path(source), Path(tmp) if step.kind != "target" else out_dir,
                    source_format=plan.source_format, files=files, outputs=outputs, provenance=prov, stem=stem,
                    split_max_bytes=split_max_bytes if step.kind == "target" else None,
                    progress=progress_for(step), evaluation_chunks=evaluation_chunks, evaluate=evaluate,
                    evaluation=evaluation_for(step.spec) if step.kind == "target" and evaluation_for else None)
                files[step.id] = done[step.id].path
        return [_kept(done[t], out_dir) for t in plan.targets]


def _kept(result: ConversionResult, out_dir: Path) -> ConversionResult:
    """A target's files moved out of the temporary folder (made there as shared inputs)."""
    import dataclasses
    import os

    if result.path.parent == out_dir:
        return result
    names = result.metadata.get("files") or [result.path.name]
    for n in names:
        os.replace(result.path.parent / n, out_dir / n)
    return dataclasses.replace(result, path=out_dir / result.path.name)
