"""Peak memory of a Quantyard conversion on a big synthetic model, against the streaming bound.

    python benchmarks/bench_memory.py [--preset full|tiny] [--target Q4_K_M] [--skip-validation]
                                      [--work-dir DIR] [--keep] [--json-out FILE]

1. Generates a Llama-shaped model in Hugging Face format: config.json, a real (tiny)
   SentencePiece tokenizer (tests/fixtures/models.py), and model.safetensors with random weights
   written tensor by tensor (and each tensor in row chunks), so generating it needs little memory;
   scaled (Init) so that a healthy Q4_K_M passes validation even at 30 layers.
   Preset "full": hidden 3072, intermediate 10240, 24 heads / 8 kv heads, vocab 8192, 9 layers,
   bf16: 2.26 GB of weights, largest tensor 60 MiB (the MLP matrices). Preset "tiny": a few MB,
   for the smoke test.
2. Converts it with Quantyard's engine in a child process (benchmarks/quantyard_phases.py: the
   public engine.convert, whose validation call is wrapped to time it separately) to Q4_K_M
   when the engine offers it, else Q8_0 (printed).
3. Reports, per phase, wall time and the child's peak RSS (kernel high-water mark, reset at each
   phase start via /proc/self/clear_refs), and the whole child's peak RSS (process-tree polling):

     write     reading, converting, quantizing and writing every tensor: the streaming part,
               checked against the bound  3 x largest tensor (bytes as stored) + 400 MiB
     validate  the engine's validation: transformers loads the whole source model in float32
               and llama.cpp loads the artifact, so it is bounded by the model, not the tensor;
               reported, not checked (--skip-validation skips it)

Disk: the full preset needs about 2.3 GB for the model plus the artifact (~1.3 GB at Q4_K_M /
2.4 GB at Q8_0); both are removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MB, ensure_repo_on_path, fmt_mb, fmt_s, last_line, run_measured, table  # noqa: E402

HERE = Path(__file__).resolve().parent
OVERHEAD_BYTES = 400 * MB
_ST_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str = "bfloat16"


PRESETS = {
    "full": Shape(hidden=3072, intermediate=10240, layers=9, heads=24, kv_heads=8, vocab=8192),
    "tiny": Shape(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512),
    # --scaling: 6.14 GB of bf16 weights (30 layers of 201 MB), largest tensor 48 MiB; half: 15 layers
    "big": Shape(hidden=3072, intermediate=8192, layers=30, heads=24, kv_heads=8, vocab=8192),
}
SCALING_OVERHEAD_BYTES = 1024 * MB  # the bound: 3 x largest tensor + 1 GB of anonymous memory


def tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = s.hidden // s.heads
    kv = s.kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "self_attn.q_proj.weight", (s.hidden, s.hidden)),
            (p + "self_attn.k_proj.weight", (kv, s.hidden)),
            (p + "self_attn.v_proj.weight", (kv, s.hidden)),
            (p + "self_attn.o_proj.weight", (s.hidden, s.hidden)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
            (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
        ]
    out += [("model.norm.weight", (s.hidden,)), ("lm_head.weight", (s.vocab, s.hidden))]
    return out


def _encode(x, dtype: str) -> bytes:
    import numpy as np

    if dtype == "bfloat16":  # round to nearest even, then keep the top half of the float32
        u = x.astype(np.float32).view(np.uint32)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype("<u2").tobytes()
    return x.astype("<f2" if dtype == "float16" else "<f4").tobytes()


@dataclass(frozen=True)
class Init:
    """How the random weights are drawn. A matrix gets std gain / sqrt(fan_in), so its output has
    about `gain` times its input's RMS whatever the width. With the usual std 0.02 everywhere a
    deep random Llama is chaotic: every block adds as much as the whole residual stream, so 4-bit
    rounding noise reshuffles the final hidden state and a healthy Q4_K_M failed validation
    (top-1 0.06-0.15, bound 0.22). Here the embedding dominates the residual and each block
    nudges it, as in a trained model, so top-1 measures the artifact rather than the chaos."""

    embed_std: float = 1.0
    block_gain: float = 0.25
    head_gain: float = 4.0

    def std(self, name: str, fan_in: int) -> float:
        if name == "model.embed_tokens.weight":
            return self.embed_std
        return (self.head_gain if name == "lm_head.weight" else self.block_gain) / math.sqrt(fan_in)


def write_synthetic_safetensors(path: Path, s: Shape, *, seed: int = 0, init: Init | None = None,
                                chunk_values: int = 4 * 1024 * 1024) -> dict:
    """Random weights, one tensor at a time, each in chunks of rows; returns size facts."""
    import numpy as np

    st_dtype, width = _ST_DTYPES[s.dtype]
    shapes = tensor_shapes(s)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        n = math.prod(shape) * width
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape in shapes:
            if len(shape) == 1:  # norms: around 1, not exactly
                fh.write(_encode(1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32), s.dtype))
                continue
            rows, cols = shape
            std = (init or Init()).std(name, cols)
            step = max(1, chunk_values // cols)
            for r in range(0, rows, step):
                block = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32) * std
                fh.write(_encode(block, s.dtype))
    largest = max(math.prod(shape) for _, shape in shapes)
    return {"weights_bytes": offset, "file_bytes": path.stat().st_size, "tensor_count": len(shapes),
            "largest_tensor_bytes": largest * width, "largest_tensor_f32_bytes": largest * 4,
            "parameters": sum(math.prod(shape) for _, shape in shapes)}


def make_synthetic_model(dest: Path, s: Shape, *, seed: int = 0, init: Init | None = None) -> dict:
    """A Llama-shaped HF folder with a real SentencePiece tokenizer and random weights."""
    ensure_repo_on_path()
    from tests.fixtures.models import save_tiny_llama_tokenizer, train_tiny_sentencepiece

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_tiny_sentencepiece(Path(tmp) / "sp.model", vocab_size=512, seed=seed)
        n_tok = save_tiny_llama_tokenizer(dest, sp)
    if n_tok > s.vocab:
        raise ValueError(f"tokenizer has {n_tok} tokens, more than the model's vocab {s.vocab}")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.hidden,
        "intermediate_size": s.intermediate, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "head_dim": s.hidden // s.heads, "vocab_size": s.vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": s.dtype, "initializer_range": 0.02,
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    start = time.perf_counter()
    facts = write_synthetic_safetensors(dest / "model.safetensors", s, seed=seed, init=init)
    facts["generate_seconds"] = time.perf_counter() - start
    facts["tokenizer_tokens"] = n_tok
    return facts


def pick_target(requested: str | None) -> tuple[str, str]:
    ensure_repo_on_path()
    from quantyard import engine

    for t in ([requested] if requested else ["Q4_K_M", "Q8_0"]):
        try:
            engine.parse_target(f"gguf:{t}")
            why = "requested" if requested else ("Q4_K_M supported" if t == "Q4_K_M"
                                                 else "Q4_K_M not supported by this engine yet: fell back to Q8_0")
            return t, why
        except engine.UnsupportedTarget as exc:
            if requested:
                raise SystemExit(f"--target {requested}: {exc}") from None
    raise SystemExit("the engine supports neither Q4_K_M nor Q8_0")


def run(args) -> dict:
    shape = PRESETS[args.preset]
    if args.layers:
        shape = Shape(**{**shape.__dict__, "layers": args.layers})
    target, why = pick_target(args.target)
    print(f"target: {target} ({why})", flush=True)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="quantyard-membench-"))
    work.mkdir(parents=True, exist_ok=True)
    model, out = work / "synthetic-llama", work / "out"
    try:
        print(f"generating {args.preset} model in {model} ...", flush=True)
        facts = make_synthetic_model(model, shape)
        print(f"  {facts['weights_bytes'] / 1e9:.2f} GB weights, {facts['tensor_count']} tensors, largest "
              f"{facts['largest_tensor_bytes'] / MB:.1f} MiB, generated in {facts['generate_seconds']:.1f} s",
              flush=True)
        report = work / "phases.json"
        argv = [sys.executable, str(HERE / "quantyard_phases.py"), str(model), "--target", f"gguf:{target}",
                "-o", str(out), "--json-out", str(report)]
        if args.skip_validation:
            argv.append("--skip-validation")
        print(f"converting to {target}{' (validation skipped)' if args.skip_validation else ''} ...", flush=True)
        m = run_measured(argv)
        doc = json.loads(report.read_text()) if report.is_file() else {}
        result = {"preset": args.preset, "shape": shape.__dict__, "model": facts, "target": target,
                  "target_reason": why, "validation": "skipped" if args.skip_validation else "engine",
                  "returncode": m.returncode, "error": None if m.ok else (doc.get("error") or last_line(m.stderr)),
                  "process_seconds": m.seconds, "process_peak_rss": m.peak_rss,
                  "phases": doc.get("phases", {}), "rss_method": doc.get("rss_method"),
                  "output_bytes": doc.get("size_bytes"), "metrics": doc.get("metrics"), "note": doc.get("note")}
        bound = 3 * facts["largest_tensor_bytes"] + OVERHEAD_BYTES
        write_peak = result["phases"].get("write", {}).get("peak_rss")
        result["bound_bytes"] = bound
        result["bound_f32_bytes"] = 3 * facts["largest_tensor_f32_bytes"] + OVERHEAD_BYTES
        result["write_within_bound"] = None if write_peak is None else write_peak <= bound
        return result
    finally:
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            if args.work_dir is None:
                shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------- --scaling: memory flat in size


def _quantyard_convert(model: Path, out: Path, target: str):
    """`quantyard convert` as a user runs it (validation included: the product has no switch)."""
    return run_measured([sys.executable, "-m", "quantyard.cli", "convert", str(model), "--target",
                         f"gguf:{target}", "-o", str(out), "--json"], cwd=HERE.parent)


def _llama_convert(model: Path, out: Path, target: str) -> list[dict]:
    """llama.cpp's two commands: convert_hf_to_gguf.py --outtype f16, llama-quantize."""
    from llama_tools import find_llama_tools

    tools = find_llama_tools()
    if tools is None:
        return [{"step": "llama.cpp tools missing (scripts/build-llama-tools.sh)", "ok": False}]
    out.mkdir(parents=True, exist_ok=True)
    f16, final = out / "llama-f16.gguf", out / f"llama-{target}.gguf"
    steps = []
    try:
        m = run_measured([sys.executable, str(tools.convert_script), str(model), "--outtype", "f16",
                          "--outfile", str(f16)], env=tools.convert_env())
        steps.append(_step_doc("convert_hf_to_gguf --outtype f16", m))
        if m.ok:
            m = run_measured([str(tools.quantize), str(f16), str(final), target])
            steps.append(_step_doc(f"llama-quantize {target}", m))
    finally:
        f16.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
    return steps


def _step_doc(name: str, m) -> dict:
    return {"step": name, "ok": m.ok, "seconds": m.seconds, "peak_rss": m.peak_rss, "peak_anon": m.peak_anon,
            "error": None if m.ok else last_line(m.stderr)}


def run_scaling(args) -> dict:
    """The same shape at its full layer count and at half of it, each converted by Quantyard
    (validated) and by llama.cpp in this run; the models are deleted as soon as measured."""
    base = PRESETS[args.preset]
    target, _ = pick_target(args.target)
    layers = args.layers or base.layers
    work = args.work_dir or (HERE.parent / ".bench-cache" / "bench-memory")
    work.mkdir(parents=True, exist_ok=True)
    sizes = []
    for n in (max(1, layers // 2), layers):
        shape = Shape(**{**base.__dict__, "layers": n})
        model, out = work / f"synthetic-llama-{n}l", work / f"out-{n}l"
        try:
            print(f"generating {n} layers in {model} ...", flush=True)
            facts = make_synthetic_model(model, shape)
            print(f"  {facts['weights_bytes'] / 1e9:.2f} GB; quantyard convert {target} ...", flush=True)
            m = _quantyard_convert(model, out, target)
            ours = _step_doc(f"quantyard convert gguf:{target}", m)
            if m.ok:
                ours["metrics"] = json.loads(m.stdout)[0]["metrics"]
            print(f"  {ours['seconds']:.0f} s, anon {fmt_mb(ours['peak_anon'])} MiB; llama.cpp ...", flush=True)
            theirs = [] if args.no_llama else _llama_convert(model, out / "llama", target)
        finally:
            if not args.keep:
                shutil.rmtree(model, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
        bound = 3 * facts["largest_tensor_bytes"] + SCALING_OVERHEAD_BYTES
        sizes.append({"layers": n, "model": facts, "quantyard": ours, "llama_cpp": theirs, "bound_bytes": bound,
                      "within_bound": ours["ok"] and ours["peak_anon"] <= bound})
    return {"mode": "scaling", "preset": args.preset, "shape": base.__dict__, "target": target, "sizes": sizes}


def render_scaling(r: dict) -> str:
    s = r["shape"]
    rows = []
    for z in r["sizes"]:
        gb = f"{z['model']['weights_bytes'] / 1e9:.2f} GB"
        q = z["quantyard"]
        verdict = "PASS" if z["within_bound"] else "FAIL"
        rows.append([gb, q["step"] + ("" if q["ok"] else " FAILED"), fmt_s(q["seconds"]), fmt_mb(q["peak_rss"]),
                     fmt_mb(q["peak_anon"]), f"{verdict} (bound {fmt_mb(z['bound_bytes'])})"])
        for st in z["llama_cpp"]:
            rows.append([gb, "llama.cpp " + st["step"] + ("" if st["ok"] else " FAILED"), fmt_s(st.get("seconds")),
                         fmt_mb(st.get("peak_rss")), fmt_mb(st.get("peak_anon")), ""])
    lines = [f"synthetic Llama: hidden {s['hidden']}, intermediate {s['intermediate']}, heads {s['heads']}/"
             f"{s['kv_heads']}, vocab {s['vocab']}, {s['dtype']}; target {r['target']}; Quantyard validates "
             "(bounded reference + llama.cpp logits), llama.cpp does not", "",
             table(["model", "command", "wall s", "peak RSS MiB", "peak anon MiB", "anon vs 3 x largest + 1 GiB"],
                   rows)]
    small, big = r["sizes"][0], r["sizes"][-1]
    if small["quantyard"]["ok"] and big["quantyard"]["ok"] and small is not big:
        grow = big["quantyard"]["peak_anon"] - small["quantyard"]["peak_anon"]
        more = big["model"]["weights_bytes"] - small["model"]["weights_bytes"]
        lines.append(f"\nQuantyard anonymous memory: {grow / MB:+.0f} MiB for {more / MB:+.0f} MiB more model "
                     f"({grow / more:.1%} of the added size)")
    for z in r["sizes"]:
        m = z["quantyard"].get("metrics") or {}
        if "mean_kl" in m:
            lines.append(f"{z['layers']} layers: validation top1 {m.get('top1_agreement', float('nan')):.3f}, "
                         f"mean KL {m['mean_kl']:.3g}")
    lines.append("peak RSS counts mapped file pages (the model, page cache); anon = RssAnon summed over the "
                 "process tree, sampled every 50 ms. Shared 2-core VM: times are noisy, repeat before trusting them.")
    return "\n".join(lines)


def render(r: dict) -> str:
    f = r["model"]
    s = r["shape"]
    lines = [
        f"model: synthetic Llama ({r['preset']}): hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{s['layers']} layers, heads {s['heads']}/{s['kv_heads']}, vocab {s['vocab']}, {s['dtype']}; "
        f"{f['weights_bytes'] / 1e9:.2f} GB in {f['tensor_count']} tensors; largest tensor "
        f"{f['largest_tensor_bytes'] / MB:.1f} MiB as stored ({f['largest_tensor_f32_bytes'] / MB:.1f} MiB as f32)",
        f"target: {r['target']} ({r['target_reason']}); validation: {r['validation']}",
        "",
    ]
    rows = []
    bound = r["bound_bytes"]
    for name, ph in r["phases"].items():
        check = ""
        if name == "write":
            check = ("PASS" if ph["peak_rss"] <= bound else "FAIL") + f" (bound {fmt_mb(bound)} MiB)"
        elif name == "validate":
            check = "not bounded (loads the whole model)" if r["validation"] == "engine" else "skipped"
        elif name == "after-validate":
            check = "after validation (its memory still held)"
        rows.append([name, fmt_s(ph["seconds"]), fmt_mb(ph["peak_rss"]), fmt_mb(ph.get("peak_anon")),
                     fmt_mb(ph.get("peak_file")), check])
    rows.append(["whole process", fmt_s(r["process_seconds"]), fmt_mb(r["process_peak_rss"]), "", "",
                 "process tree, polled"])
    lines.append(table(["phase", "wall s", "peak RSS MiB", "anon MiB", "file-backed MiB",
                        "vs 3 x largest + 400 MiB"], rows))
    lines.append("")
    lines.append(f"bound = 3 x {f['largest_tensor_bytes'] / MB:.1f} MiB + 400 MiB = {fmt_mb(bound)} MiB "
                 f"(with the largest tensor counted as f32: {fmt_mb(r['bound_f32_bytes'])} MiB)")
    if r["output_bytes"]:
        lines.append(f"artifact: {r['output_bytes'] / 1e9:.2f} GB")
    if r["metrics"]:
        m = r["metrics"]
        if "mean_kl" in m:
            lines.append(f"validation metrics: top1 {m.get('top1_agreement', float('nan')):.3f}, "
                         f"mean KL {m['mean_kl']:.3g}")
    if r["error"]:
        lines.append(f"conversion FAILED (exit {r['returncode']}): {r['error']}")
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    lines.append(f"per-phase peak RSS: {r['rss_method']}; each phase's peak is that of the whole process "
                 "during the phase (interpreter and libraries included). anon / file-backed: peaks of "
                 "RssAnon and RssFile+RssShmem sampled every 5 ms (file-backed = mapped files, e.g. a "
                 "memory-mapped model; they count in RSS though the kernel can drop them).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="peak RSS of a Quantyard conversion of a big synthetic model")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--target", help="quantization (default: Q4_K_M if supported, else Q8_0)")
    ap.add_argument("--skip-validation", action="store_true",
                    help="measure conversion only (no validation)")
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the model and the artifact")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--scaling", action="store_true",
                    help="quantyard convert (validated) at the preset's layers and half of them, beside "
                         "llama.cpp; peak anonymous memory against 3 x largest tensor + 1 GiB")
    ap.add_argument("--no-llama", action="store_true", help="--scaling without the llama.cpp commands")
    args = ap.parse_args(argv)
    if args.scaling:
        result = run_scaling(args)
        print(render_scaling(result))
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2, default=str))
        return 0 if all(z["within_bound"] for z in result["sizes"]) else 2
    result = run(args)
    print(render(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str))
    if result["returncode"] != 0:
        return 1
    return 0 if result["write_within_bound"] else 2


if __name__ == "__main__":
    sys.exit(main())
