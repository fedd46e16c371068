"""Program sources to ONNX: torch.export / TorchScript programs exported with torch.onnx
(dynamo), .onnx sources optimized by onnxruntime; then the same quantizers as Hugging Face
folders, validation on three input sets of different sizes, measurements.

The oracle is the source itself: the torch program (the .pt2's module, the TorchScript module)
or, for an .onnx source, onnxruntime running the source file.

int8-static calibrates on random feeds drawn from the input specs (floats ~ N(0, 1), integers
in their range), `calibration.samples` of them (default 16): fine when real inputs look like
that, not when they don't; int8-dynamic needs no calibration and is the safer default.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import sandbox
from ..errors import ConversionError, InvalidModel, UnsupportedTarget, ValidationFailed
from ..manifest import ENGINE_VERSION
from ..results import ConversionResult, PreflightReport
from ..sandbox import Limits
from ..spec import TargetSpec
from .modelio import artifact_files, artifact_size, consolidate, finalize, is_large
from .options import OnnxOptions, parse_options
from .ort_errors import ort_reason, source_runner, source_session
from .program import (
    SETS,
    ProgramSource,
    Specs,
    batch_override,
    check_external_data,
    declared_specs,
    describe,
    finish_specs,
    match_names,
    onnx_graph,
    onnx_specs,
    sample_inputs,
    vet_pt2,
    vet_torchscript,
)
from .program_child import feeds_digest, load_references, specs_from_child
from .program_vet import vet_pt2_archive, vet_torchscript_archive

Progress = Callable[[float, str], None]
THROUGHPUT_BATCH = 8
PROGRAM_OPSET = 18
# size of each quantization relative to fp32, for preflight estimates of programs whose weights
# are not read (a .pt2 or TorchScript file's size is all preflight looks at)
_RATIO = {"fp32": 1.0, "fp16": 0.5, "int8-dynamic": 0.27, "int8-static": 0.3, "int4": 0.2}
# the sandboxed child that loads and exports a torch program: torch.onnx's dynamo export of a
# model of a few hundred MB peaks at a few GB of address space
PROGRAM_LIMITS = Limits(memory_bytes=16 << 30, cpu_seconds=3600, wall_seconds=3600.0, file_bytes=32 << 30)


@dataclass
class Prepared:
    src: ProgramSource
    specs: Specs
    reference: Callable[[dict], list]  # numpy feeds -> numpy outputs of the source
    program: Any  # TorchProgram for torch sources, else None


def _tell(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)  # may raise Cancelled


# ---------------------------------------------------------------- specs and preflight


def _specs_for(src: ProgramSource, params: Mapping[str, Any], *, program=None, graph=None) -> Specs:
    declared, axes = declared_specs(src, params)
    if src.kind == "onnx":
        own = onnx_specs(graph, src.model_file)
        names = [s.name for s in own]
        return finish_specs(match_names(declared, names, what=src.model_file) if declared else own, axes)
    if program is None:  # preflight: only what the user declared can be checked
        return finish_specs(declared or [], axes)
    if declared:
        chosen = match_names(declared, list(program.names), required=list(program.required), what=src.model_file)
    elif program.specs is not None:
        chosen = program.specs
    else:
        raise InvalidModel(f"{src.model_file} is TorchScript, which records no input shapes: add inputs.json to the "
                           'folder or give params inputs, e.g. [{"name": "x", "shape": ["batch", 3, 32, 32], '
                           '"dtype": "float32"}]', details={"inputs": list(program.names)})
    return finish_specs(chosen, axes, program.bounds)


def preflight_program(root: Path, targets: list[TargetSpec]) -> PreflightReport:
    """File names, bytes, the .onnx graph without tensors; no program is loaded."""
    src = describe(Path(root))
    opts = [parse_options(t) for t in targets]
    for t in targets:
        if src.kind == "onnx":
            graph = onnx_graph(src)
            _specs_for(src, t.params, graph=graph)
        else:
            _specs_for(src, t.params)
            declared, _ = declared_specs(src, t.params)
            if src.kind == "torchscript" and not declared:
                raise InvalidModel(f"{src.model_file} is TorchScript, which records no input shapes: add inputs.json "
                                   "to the folder or give params inputs")
    if src.kind == "torch.export":
        vet_pt2(src.path)
    elif src.kind == "torchscript":
        vet_torchscript(src.path)
    fp32 = _fp32_bytes(src)
    estimates = {t.key: {"size_bytes": int(fp32 * _RATIO[o.quantization]) + 100_000,
                         "peak_memory_bytes": 4 * fp32 + 200_000_000, "disk_bytes": 3 * fp32}
                 for t, o in zip(targets, opts, strict=False)}
    return PreflightReport(architecture=src.kind, parameter_count=fp32 // 4, source_dtype="unknown",
                           estimates=estimates)


def onnx_graph_of(path: Path):
    """An .onnx file's graph without its tensors (a file the sandboxed child wrote)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends
        raise InvalidModel(f"the export of {path.name} is not a readable ONNX model") from None


def _fp32_bytes(src: ProgramSource) -> int:
    if src.kind != "onnx":
        return src.path.stat().st_size
    import numpy as np
    from onnx import helper

    graph = onnx_graph(src).graph
    return sum(int(np.prod(t.dims, dtype=np.int64)) * 4 for t in graph.initializer
               if helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f") or src.path.stat().st_size


# ---------------------------------------------------------------- the source as an oracle


def _flat_numpy(out) -> list:
    import torch

    leaves = torch.utils._pytree.tree_leaves(out)
    return [t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy()
            for t in leaves if isinstance(t, torch.Tensor)]


def prepare(root: Path, params: Mapping[str, Any]) -> Prepared:
    """An .onnx source with onnxruntime as its oracle. Torch programs are never loaded in this
    process: see prepare_sandboxed."""
    src = describe(Path(root))
    if src.kind != "onnx":
        raise TypeError(f"{src.kind} programs load only in the sandbox (prepare_sandboxed)")
    graph = onnx_graph(src)  # external data checked before onnxruntime reads any of it
    specs = _specs_for(src, params, graph=graph)
    sess = source_session(src.path, src.model_file)
    return Prepared(src, specs, source_runner(sess, src.model_file), None)


def prepare_sandboxed(src: ProgramSource, params: Mapping[str, Any], fp32: Path, opset: int, work: Path, *,
                      limits: Limits, progress: Progress | None = None) -> tuple[Prepared, dict]:
    """Load the program, export it to `fp32` and compute its reference outputs in a sandboxed
    child (program_child); here only JSON, .npy arrays and the .onnx file come back, all checked."""
    scratch = work / "sandbox"
    kwargs = {"root": str(src.root.resolve()), "params": dict(params), "fp32": str(fp32.resolve()), "opset": opset,
              "refs": str(scratch.resolve())}
    outcome = sandbox.run("quantyard.engine.onnx.program_child:export_in_child", kwargs, scratch=scratch,
                          limits=limits, label=src.model_file, writable=[fp32.parent], readable=[src.root],
                          on_wait=lambda _: _tell(progress, 0.1, "exporting to ONNX fp32 (sandboxed)"), poll_seconds=10)
    value = outcome.value if isinstance(outcome.value, dict) else {}
    specs = specs_from_child(value.get("specs"), src.model_file)
    references = load_references(value.get("references"), scratch, src.model_file)
    check_external_data(ProgramSource(fp32.parent, "onnx", fp32.name, False), onnx_graph_of(fp32))

    def reference(feeds: dict) -> list:
        found = references.get(feeds_digest(feeds, specs.names))
        if found is None:
            raise KeyError("no reference outputs were computed for these feeds")
        return found

    raw_info = value.get("info")
    info = raw_info if isinstance(raw_info, dict) else {}
    info = {k: v for k, v in info.items() if k in ("opset", "exporter")}
    info["sandbox"] = {**outcome.protections, "peak_rss_bytes": outcome.peak_rss_bytes,
                       "cpu_seconds": round(outcome.cpu_seconds, 2), "seconds": round(outcome.seconds, 2)}
    return Prepared(src, specs, reference, None), info


# ---------------------------------------------------------------- fp32


def _export_args(prep: Prepared):
    """Example tensors with every dynamic axis at 2 or more (torch.export specializes 0 and 1)."""
    import torch

    sizes = {a: max(2, s[1]) for a, s in prep.specs.axes.items()}
    feeds = sample_inputs(prep.specs, 1, override=sizes)
    return tuple(torch.from_numpy(feeds[n]) for n in prep.specs.names)


def _dynamic_shapes(specs: Specs):
    import torch

    dims = {a: torch.export.Dim(_dim_name(a)) for a in specs.axes}
    return tuple({i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)} or None for s in specs.inputs)


def _dim_name(axis: str) -> str:
    import re

    name = re.sub(r"\W", "_", axis)
    return name if name[:1].isalpha() else f"d_{name}"


def export_program(prep: Prepared, path: Path, opset: int) -> dict:
    """torch.onnx.export(dynamo=True) with the specs' named axes dynamic. TorchScript has no
    torch.export path of its own: torch's TS2EPConverter turns it into an FX module first."""
    import torch

    from .modelio import data_path

    args = _export_args(prep)
    module = prep.program.exportable
    if module is None:
        from torch._export.converter import TS2EPConverter

        try:
            module = TS2EPConverter(prep.program.module, args).convert().module()
        except Exception as e:  # the converter raises many types; all mean "won't convert"
            raise ConversionError(f"TorchScript to torch.export failed: {type(e).__name__}: {str(e)[:400]}") from e
    try:
        onnx_program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                         input_names=list(prep.specs.names), dynamic_shapes=_dynamic_shapes(prep.specs),
                                         external_data=True, optimize=True, verbose=False)
    except Exception as e:  # the exporter raises many types; all mean "this program won't export"
        raise ConversionError(f"torch.onnx.export failed: {type(e).__name__}: {str(e)[:500]}") from e
    if onnx_program is None:
        raise ConversionError("torch.onnx.export returned no program")
    data_path(path).unlink(missing_ok=True)
    onnx_program.save(str(path), external_data=True)
    consolidate(path)
    via = "TS2EPConverter + " if prep.program.exportable is None else ""
    return {"opset": opset, "exporter": f"{via}torch.onnx dynamo (torch {torch.__version__})"}


def optimize_source(src: ProgramSource, path: Path) -> dict:
    """An .onnx source is its own fp32: onnxruntime's basic (level 1, hardware-independent)
    graph optimizations, run offline and saved, so the file runs the same on any worker."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(path)
    from onnx.external_data_helper import uses_external_data

    if any(uses_external_data(t) for t in onnx_graph(src).graph.initializer):
        # written beside the optimized model, then folded back into one file when small enough
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", path.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    source_session(src.path, src.model_file, so)
    consolidate(path)
    return {"optimizer": f"onnxruntime {ort.__version__} basic graph optimizations (level 1)"}


# ---------------------------------------------------------------- quantization


def _int8_static(prep: Prepared, src: Path, dst: Path, opts: OnnxOptions, samples: int) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .calibration import feeds_reader

    batches = [sample_inputs(prep.specs, 0, seed=100 + i) for i in range(samples)]
    quantize_static(str(src), str(dst), feeds_reader(batches), quant_format=QuantFormat.QDQ, per_channel=opts.per_channel,
                    reduce_range=opts.reduce_range, activation_type=QuantType.QUInt8,
                    weight_type=QuantType[opts.weight_type],
                    calibrate_method=CalibrationMethod[opts.calibration_method], use_external_data_format=is_large(src))
    return {"format": "QDQ", "calibration_method": opts.calibration_method, "calibration_samples": samples,
            "calibration_data": "random feeds from the input specs", "per_channel": opts.per_channel}


def _samples(params: Mapping[str, Any]) -> int:
    cal = params.get("calibration")
    value = cal.get("samples", 16) if isinstance(cal, Mapping) else 16
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise UnsupportedTarget(f"onnx param calibration.samples must be an integer from 1 to 1000, not {value!r}")
    return value


def _count_ops(path: Path, op: str) -> int:
    import onnx

    return sum(n.op_type == op for n in onnx.load(str(path), load_external_data=False).graph.node)


def quantize(prep: Prepared, fp32: Path, dst: Path, opts: OnnxOptions, params: Mapping[str, Any]) -> dict:
    """QUANTIZERS for fp16 / int8-dynamic / int4 (they read nothing of the context); int8-static
    here, calibrated on sample feeds (quantize.py's reads a tokenizer and a BERT config)."""
    from .quantize import QUANTIZERS, QuantContext

    if opts.quantization == "int8-static":
        info = _int8_static(prep, fp32, dst, opts, _samples(params))
    else:
        info = QUANTIZERS[opts.quantization](fp32, dst, opts, QuantContext({}, None, prep.specs.names))
    consolidate(dst)
    if opts.quantization == "int4" and not _count_ops(dst, "MatMulNBits"):
        raise UnsupportedTarget("int4 quantizes MatMul weights (onnxruntime's MatMulNBits) and this program has no "
                                "MatMul with a constant weight (Conv and Gemm stay float); use int8-dynamic")
    return info


# ---------------------------------------------------------------- validation and speed


def _rows(a):
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)


def compare_outputs(outs: list, refs: list) -> dict:
    import numpy as np

    if len(outs) != len(refs):
        raise ValidationFailed(f"the ONNX model has {len(outs)} outputs, the source {len(refs)}")
    diff, cos = 0.0, 1.0
    for i, (out, ref) in enumerate(zip(outs, refs, strict=False)):
        if out.shape != ref.shape:
            raise ValidationFailed(f"output {i} has shape {out.shape}, the source's {ref.shape}")
        if not np.isfinite(np.asarray(out, dtype=np.float64)).all():
            raise ValidationFailed(f"output {i} holds NaN or infinity", details={"finite": False})
        a, b = _rows(out), _rows(ref)
        diff = max(diff, float(np.abs(a - b).max()) if a.size else 0.0)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        row_cos = np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-30),
                           np.where(np.abs(a - b).max(1) == 0, 1.0, 0.0))
        cos = min(cos, float(row_cos.min()) if row_cos.size else 1.0)
    return {"max_abs_diff": diff, "cosine_min": cos}


def validate(prep: Prepared, path: Path, opts: OnnxOptions) -> dict:
    """The artifact vs the source on SETS input sets of different sizes along the dynamic axes."""
    from .validate import session

    try:
        sess = session(path)
    except MemoryError:
        raise
    except Exception as e:  # onnxruntime's own exception types: all mean "doesn't load"; its text names our path
        raise ValidationFailed(f"onnxruntime cannot load {path.name}: {ort_reason(e)}") from e
    worst: dict[str, Any] = {"max_abs_diff": 0.0, "cosine_min": 1.0}
    for index in range(SETS):
        feeds = sample_inputs(prep.specs, index, seed=7)
        try:
            outs = sess.run(None, feeds)
        except Exception as e:
            raise ValidationFailed(f"onnxruntime cannot run {path.name} on set {index} "
                                   f"{ {k: list(v.shape) for k, v in feeds.items()} }: {str(e)[:300]}") from e
        numbers = compare_outputs(outs, prep.reference(feeds))
        worst = {"max_abs_diff": max(worst["max_abs_diff"], numbers["max_abs_diff"]),
                 "cosine_min": min(worst["cosine_min"], numbers["cosine_min"])}
    worst.update(tolerance_max_abs_diff=opts.max_abs_diff, tolerance_min_cosine=opts.min_cosine,
                 validation_sets=SETS, axis_sizes={a: list(s) for a, s in prep.specs.axes.items()},
                 reference="onnxruntime on the source .onnx" if prep.src.kind == "onnx" else f"{prep.src.kind} in PyTorch")
    failures = []
    if worst["max_abs_diff"] > opts.max_abs_diff:
        failures.append(f"max abs diff {worst['max_abs_diff']:.6g} > tolerance {opts.max_abs_diff:.6g}")
    if worst["cosine_min"] < opts.min_cosine:
        failures.append(f"cosine similarity {worst['cosine_min']:.6f} < tolerance {opts.min_cosine:.6f}")
    if failures:
        raise ValidationFailed(f"{path.name} does not match its source: " + "; ".join(failures), details=worst)
    return worst


def measure(prep: Prepared, path: Path, runs: int = 20) -> dict:
    """p50/p90 latency at batch 1 (other axes at their base size) and throughput at batch 8."""
    import time

    import numpy as np
    import onnxruntime as ort

    from .validate import session

    sess = session(path)

    def timings(feeds: dict, n: int) -> list[float]:
        sess.run(None, feeds)  # warm-up
        out = []
        for _ in range(n):
            start = time.perf_counter()
            sess.run(None, feeds)
            out.append(time.perf_counter() - start)
        return out

    single = np.array(timings(sample_inputs(prep.specs, 0, override=batch_override(prep.specs, 1)), runs))
    batch = THROUGHPUT_BATCH if prep.specs.batch_axes else 1
    many = timings(sample_inputs(prep.specs, 0, override=batch_override(prep.specs, batch)), max(3, runs // 4))
    return {"latency_ms_p50": float(np.percentile(single, 50) * 1e3),
            "latency_ms_p90": float(np.percentile(single, 90) * 1e3),
            "throughput_samples_per_s": float(batch * len(many) / sum(many)), "throughput_batch": batch,
            "timing_runs": runs, "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider"}


# ---------------------------------------------------------------- the whole conversion


def _stamp(path: Path, provenance: Mapping[str, str] | None, opts: OnnxOptions, kind: str) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {"quantized_by": "Quantyard", "quantyard.engine_version": ENGINE_VERSION,
             "quantyard.quantization": opts.quantization, "quantyard.source_kind": kind}
    props.update({f"quantyard.{k}": str(v) for k, v in (provenance or {}).items() if v})
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(path))


def convert_program(root: Path, target: TargetSpec, out_dir: Path, *, progress: Progress | None = None,
                    provenance: Mapping[str, str] | None = None,
                    sandbox_limits: Limits | None = None) -> ConversionResult:
    """One validated, measured ONNX artifact from a program source; torch programs are loaded
    and exported only in a sandboxed child (`sandbox_limits`, default PROGRAM_LIMITS)."""
    from .convert import output_filename

    opts = parse_options(target)
    if "opset" not in target.params:
        # torch.onnx implements opset 18 and up: asking for 17 means a down-conversion that
        # fails on some ops (ReduceMean's axes) and keeps 18 anyway
        opts = replace(opts, opset=PROGRAM_OPSET)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = describe(Path(root))
    name = (provenance or {}).get("name") or Path(src.model_file).stem
    path = out_dir / output_filename(name, opts.quantization)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-work-") as tmp:
        fp32 = path if opts.quantization == "fp32" else Path(tmp) / "fp32.onnx"
        if src.kind == "onnx":
            _tell(progress, 0.0, "reading the source graph")
            prep = prepare(src.root, target.params)
            _tell(progress, 0.1, "optimizing the source graph")
            info = optimize_source(src, fp32)
        else:  # the archive's structure first (no torch here), then torch only in the child
            (vet_pt2_archive if src.kind == "torch.export" else vet_torchscript_archive)(src.path)
            _tell(progress, 0.0, "loading the program and exporting it to ONNX fp32 (sandboxed)")
            prep, info = prepare_sandboxed(src, target.params, fp32, opts.opset, Path(tmp),
                                           limits=sandbox_limits or PROGRAM_LIMITS, progress=progress)
        fp32_size = artifact_size(fp32)
        if opts.quantization != "fp32":
            _tell(progress, 0.5, f"quantizing to {opts.quantization}")
            info["quantization"] = quantize(prep, fp32, path, opts, target.params)
    _stamp(path, provenance, opts, prep.src.kind)
    finalize(path, external_data=opts.external_data)  # validated as it ships
    _tell(progress, 0.8, "validating against the source")
    metrics = validate(prep, path, opts)
    metrics.update(measure(prep, path))
    size = artifact_size(path)
    fp32_size = size if opts.quantization == "fp32" else fp32_size  # the stamp adds a few bytes
    metrics.update(size_bytes=size, fp32_size_bytes=fp32_size, compression_vs_fp32=fp32_size / size)
    metadata = {"task": "program", "source_kind": prep.src.kind, "model_file": prep.src.model_file,
                "inputs": prep.specs.to_json(), "dynamic_axes": sorted(prep.specs.axes),
                "files": [p.name for p in artifact_files(path)], **info}
    _tell(progress, 1.0, "done")
    return ConversionResult(path=path, format="onnx", quantization=opts.quantization, size_bytes=size,
                            metadata=metadata, metrics=metrics, engine_version=ENGINE_VERSION)


__all__ = ["preflight_program", "convert_program", "prepare", "prepare_sandboxed", "compare_outputs", "Prepared",
           "PROGRAM_LIMITS"]
