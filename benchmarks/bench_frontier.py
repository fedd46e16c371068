"""Size vs quality of llama.cpp's presets and of gguf:auto's searched per-tensor mixtures.

    python benchmarks/bench_frontier.py                       # smollm2 and bpe150k (bench_models.py)
    python benchmarks/bench_frontier.py --models smollm2 --n-ctx 512 --chunks 8 --budgets Q4_K_M Q3_K_M

Per model: the F16 GGUF (our converter), the source's evaluation reference (transformers, the
shipped evaluation text, --chunks chunks of --n-ctx tokens), every preset of --presets made with
ggml's kernels and measured (mean KL, PPL ratio, top-1 vs the reference, llama.cpp runtime), then
for each budget preset B the gguf:auto search with max_size = size(B) (the presets' measurements
reused, so only mixtures are made): does a mixture of B's size beat B? Prints markdown tables and
writes .bench-cache/frontier/<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ensure_repo_on_path  # noqa: E402

ensure_repo_on_path()

from benchmarks.bench_models import model_path  # noqa: E402
from quantyard.engine import convert, parse_target  # noqa: E402
from quantyard.engine.evaluation.reference import compute_eval_reference  # noqa: E402
from quantyard.engine.evaluation.report import evaluate_gguf  # noqa: E402
from quantyard.engine.frontier import FrontierPoint, mark_pareto  # noqa: E402
from quantyard.engine.gguf.auto_budget import parse_auto_budget  # noqa: E402
from quantyard.engine.gguf.auto_local import LocalCandidates  # noqa: E402
from quantyard.engine.spec import parse_size  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / ".bench-cache" / "frontier"
PRESETS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K"]


def _row(p: FrontierPoint, pareto: bool) -> str:
    tt = ", ".join(f"{k}={v}" for k, v in (p.tensor_types or {}).items())
    base = (p.extra or {}).get("base", p.name)
    top1 = (p.extra or {}).get("top1_agreement")
    return (f"| {p.name} | {base} | {p.size_bytes / 1e6:.2f} | {p.bits_per_weight:.3f} | {p.mean_kl:.5f} | "
            f"{p.ppl_ratio:.4f} | {top1:.3f} | {'yes' if pareto else ''} | {tt} |")


def run_model(name: str, args) -> dict:
    hf = model_path(name)
    work = OUT / name
    t0 = time.monotonic()
    f16 = convert(hf, parse_target("gguf:F16"), work / "f16").path
    ref = compute_eval_reference(hf, n_ctx=args.n_ctx, max_chunks=args.chunks)
    print(f"# {name}: F16 + reference ({ref.n_scored} scored tokens) in {time.monotonic() - t0:.0f} s",
          file=sys.stderr, flush=True)
    cand = LocalCandidates(f16, work / "candidates", lambda p: evaluate_gguf(p, ref, threads=args.threads).to_dict(),
                           nthread=args.threads)
    known = {}
    for q in args.presets:
        known[q] = cand.measure(q, ())
        print(f"  {q}: {known[q].size_bytes} B, KL {known[q].mean_kl:.5f}", file=sys.stderr, flush=True)
    points = dict(known)
    budgets = []
    for b in args.budgets:
        size = known[b].size_bytes
        params = {"max_size": size, "presets": args.presets, "max_candidates": args.max_candidates}
        budget = parse_auto_budget(params, parse_size)
        result = cand.search(budget, known=known)
        points.update({p.name: p for p in result.frontier})
        w = result.winner
        budgets.append({"budget_preset": b, "max_size": size, "winner": w.name, "winner_size": w.size_bytes,
                        "winner_kl": w.mean_kl, "winner_ppl_ratio": w.ppl_ratio, "preset_kl": known[b].mean_kl,
                        "preset_ppl_ratio": known[b].ppl_ratio, "beats_preset": w.mean_kl < known[b].mean_kl,
                        "mixtures_measured": result.measured, "tensor_types": dict(result.winner_overrides),
                        "base": result.winner_quantization})
        print(f"  budget {b}: winner {w.name} KL {w.mean_kl:.5f} vs {known[b].mean_kl:.5f}", file=sys.stderr,
              flush=True)
    marked = mark_pareto(sorted(points.values(), key=lambda p: p.size_bytes))
    out = {"model": name, "n_ctx": args.n_ctx, "chunks": ref.n_chunks, "scored_tokens": ref.n_scored,
           "seconds": round(time.monotonic() - t0, 1),
           "points": [{**p.to_dict(), "pareto": ok} for p, ok in marked], "budgets": budgets}
    work.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(out, indent=1))
    print(f"\n### {name} ({ref.n_scored} scored tokens, n_ctx {args.n_ctx})\n")
    print("| name | base | MB | bpw | mean KL | PPL ratio | top-1 | Pareto | tensor types |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, ok in marked:
        print(_row(p, ok))
    print("\n| budget = size of | winner | winner KL | preset KL | mixture beats preset |")
    print("|---|---|---|---|---|")
    for b in budgets:
        print(f"| {b['budget_preset']} ({b['max_size'] / 1e6:.2f} MB) | {b['winner']} ({b['winner_size'] / 1e6:.2f} MB)"
              f" | {b['winner_kl']:.5f} | {b['preset_kl']:.5f} | {'yes' if b['beats_preset'] else 'no'} |")
    sys.stdout.flush()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "bpe150k"])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--budgets", nargs="+", default=["Q4_K_M"], help="presets whose size is a budget")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--max-candidates", type=int, default=8, help="mixtures made per budget")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    missing = set(args.budgets) - set(args.presets)
    if missing:
        raise SystemExit(f"budgets {sorted(missing)} must be among --presets")
    for name in args.models:
        run_model(name, args)


if __name__ == "__main__":
    main()
