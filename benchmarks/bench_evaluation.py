"""Quality-report cost on a 0.9B model: memory and seconds per 1k tokens, side by side with
llama.cpp's `llama-perplexity --kl-divergence-base` / `--kl-divergence` on the same file, text
and chunking (issue 13: "evaluation of a 0.9B model's artifact stays in bounded memory").

    python benchmarks/bench_evaluation.py                        # llama09b, Q4_K_M, 8 x 512 tokens
    python benchmarks/bench_evaluation.py --model smollm2 --quantization Q8_0 --chunks 16

Phases, each its own process measured by peak RSS and peak anonymous RSS of its tree:
  reference   the source's evaluation reference from the Hugging Face folder (transformers,
              weights streamed one module at a time), stored as a file: once per source;
  evaluate    the artifact's quality report against that stored file (llama.cpp runtime);
  llama.cpp   llama-perplexity's base file from the F16 GGUF, then its KL run of the artifact,
              with the runtime settings our report uses (F32 KV cache, no flash attention, no
              repacked weights, one chunk per batch).
Prints a markdown table; writes .bench-cache/evaluation/<model>-<quant>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ensure_repo_on_path, fmt_mb, run_measured, table  # noqa: E402

ensure_repo_on_path()

OUT = Path(__file__).resolve().parents[1] / ".bench-cache" / "evaluation"


def _phase_reference(args) -> None:
    from quantyard.engine.evaluation.reference import compute_eval_reference

    ref = compute_eval_reference(Path(args.hf), n_ctx=args.n_ctx, max_chunks=args.chunks)
    ref.save(Path(args.out))


def _phase_evaluate(args) -> None:
    from quantyard.engine.evaluation.reference import EvalReference
    from quantyard.engine.evaluation.report import evaluate_gguf

    report = evaluate_gguf(Path(args.gguf), EvalReference.load(Path(args.reference)), threads=args.threads)
    print("REPORT " + json.dumps(report.to_dict()))


def _child(*extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *extra]


def _perplexity_tool() -> Path:
    from benchmarks.llama_tools import default_prefix

    tool = default_prefix() / "bin" / "llama-perplexity"
    if not tool.is_file():
        raise SystemExit(f"{tool} is missing: run scripts/build-llama-tools.sh")
    return tool


def _source_bytes(hf: Path) -> int:
    return sum(p.stat().st_size for p in hf.glob("*.safetensors"))


def run(args) -> dict:
    from benchmarks.bench_models import model_path
    from quantyard.engine.evaluation.text import default_evaluation_text
    from quantyard.engine.gguf.converter import write_float_gguf
    from quantyard.engine.gguf.quantize import quantize_gguf
    from quantyard.engine.hf.source import open_source

    hf = Path(args.model) if Path(args.model).is_dir() else model_path(args.model)
    label = hf.name if Path(args.model).is_dir() else args.model
    work = args.work_dir / f"{label}-{args.quantization}-{args.n_ctx}x{args.chunks}"
    work.mkdir(parents=True, exist_ok=True)
    f16, artifact = work / "F16.gguf", work / f"{args.quantization}.gguf"
    if not f16.is_file():
        write_float_gguf(open_source(hf), f16, "F16")
    if not artifact.is_file():
        quantize_gguf(f16, artifact, args.quantization)
    text = work / "evaluation.txt"
    text.write_text(default_evaluation_text(), encoding="utf-8")
    tokens = args.chunks * args.n_ctx
    ref_path, threads = work / "evaluation.safetensors", str(args.threads)
    rows, out = [], {"model": label, "quantization": args.quantization, "n_ctx": args.n_ctx,
                     "chunks": args.chunks, "tokens_run": tokens, "source_bytes": _source_bytes(hf),
                     "artifact_bytes": artifact.stat().st_size, "threads": args.threads}

    def measured(name: str, argv: list[str]):
        m = run_measured(argv, timeout=3600)
        if m.returncode != 0:
            raise SystemExit(f"{name} failed:\n{m.stderr[-3000:]}")
        out[name] = {"seconds": m.seconds, "s_per_1k_tokens": m.seconds * 1000 / tokens,
                     "peak_rss": m.peak_rss, "peak_anon": m.peak_anon}
        return m

    measured("reference", _child("--phase", "reference", "--hf", str(hf), "--out", str(ref_path),
                                 "--n-ctx", str(args.n_ctx), "--chunks", str(args.chunks)))
    m = measured("evaluate", _child("--phase", "evaluate", "--gguf", str(artifact), "--reference", str(ref_path),
                                    "--threads", threads))
    ours = json.loads(next(line for line in m.stdout.splitlines() if line.startswith("REPORT "))[7:])
    out["evaluate"]["report"] = ours

    tool, base = _perplexity_tool(), work / "F16.kld"
    common = ["-f", str(text), "-c", str(args.n_ctx), "-b", str(args.n_ctx), "--chunks", str(args.chunks),
              "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--no-repack", "-t", threads]
    measured("llama_base", [str(tool), "-m", str(f16), "--kl-divergence-base", str(base), *common])
    from tests.oracles import KLD_ATTEMPTS, kld_output_complete, parse_llama_kld

    for _ in range(KLD_ATTEMPTS):  # llama.cpp's logger may drop its last lines at exit (tests/oracles.py)
        m = measured("llama_kld", [str(tool), "-m", str(artifact), "--kl-divergence-base", str(base),
                                   "--kl-divergence", *common])
        if kld_output_complete(m.stdout + m.stderr):
            break

    theirs = parse_llama_kld(m.stdout + m.stderr)
    out["llama_kld"]["report"] = theirs

    for name, label, kl, ppl in (
            ("reference", "Quantyard: source reference (transformers, streamed)", None, ours["ppl_source"]),
            ("evaluate", f"Quantyard: {args.quantization} report (stored reference)", ours["mean_kl"], ours["ppl"]),
            ("llama_base", "llama-perplexity --kl-divergence-base (F16 GGUF)", None, theirs["ppl_base"]),
            ("llama_kld", f"llama-perplexity --kl-divergence ({args.quantization})", theirs["mean_kl"],
             theirs["ppl"])):
        r = out[name]
        rows.append([label, f"{r['seconds']:.1f}", f"{r['s_per_1k_tokens']:.2f}", fmt_mb(r["peak_rss"]),
                     fmt_mb(r["peak_anon"]), "-" if kl is None else f"{kl:.5f}", f"{ppl:.3f}"])
    print(f"\n{label} ({fmt_mb(out['source_bytes'])} of safetensors), {args.quantization} "
          f"{fmt_mb(out['artifact_bytes'])}, {args.chunks} x {args.n_ctx} tokens, {args.threads} threads\n")
    print(table(["phase", "wall s", "s / 1k tokens", "peak RSS", "peak anon", "mean KL", "PPL"], rows))
    (args.work_dir / f"{label}-{args.quantization}.json").write_text(json.dumps(out, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama09b", help="a bench_models.py name or a Hugging Face folder")
    ap.add_argument("--work-dir", type=Path, default=OUT, help="files and the results JSON")
    ap.add_argument("--quantization", default="Q4_K_M")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--phase", choices=["reference", "evaluate"], help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "reference":
        _phase_reference(args)
    elif args.phase == "evaluate":
        _phase_evaluate(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
