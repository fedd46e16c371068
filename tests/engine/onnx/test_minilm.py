"""all-MiniLM-L6-v2 to every ONNX quantization: each artifact validated by the engine, and
re-checked here with onnxruntime vs transformers on sentences the engine never saw."""

from __future__ import annotations

import onnx
import pytest

from quantyard.engine.errors import ValidationFailed
from quantyard.engine.spec import TargetSpec

from .oracle import embeddings, max_diff_real_tokens, pooled_cosines


def _quantize(minilm_dir, fp32, quantization, tmp_path, **params):
    from quantyard.engine.onnx import quantize_from_fp32

    return quantize_from_fp32(minilm_dir, fp32.path, TargetSpec("onnx", quantization, params), tmp_path)


def _op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_fp32_matches_pytorch(minilm_dir, minilm_fp32_onnx):
    r = minilm_fp32_onnx
    assert r.path.name == "all-MiniLM-L6-v2-fp32.onnx" and r.path.is_file()
    assert r.metrics["max_abs_diff"] < 1e-4 and r.metrics["cosine_min"] > 0.99999
    for key in ("latency_ms_p50", "latency_ms_p90", "throughput_seq_per_s", "size_bytes", "compression_vs_fp32"):
        assert r.metrics[key] > 0
    assert r.metadata["fused_operators"]  # the transformer optimizer fused something
    out, ref, mask = embeddings(r.path, minilm_dir)
    assert max_diff_real_tokens(out, ref, mask) < 1e-4
    # dynamic axes: batch 3 with padding here, batch 4 in the engine, batch 2 at export


def test_int8_dynamic_full_path(minilm_dir, minilm_fp32_onnx, tmp_path):
    from quantyard.engine.onnx import convert_onnx

    seen = []
    r = convert_onnx(minilm_dir, TargetSpec("onnx", "int8-dynamic", {"per_channel": True}), tmp_path,
                     progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert r.metrics["cosine_min"] >= 0.99
    assert 3.5 < minilm_fp32_onnx.size_bytes / r.size_bytes < 4.5  # int8 ≈ 1/4 of fp32
    assert "MatMulInteger" in _op_types(r.path)
    # one activation scale per token row, outlier channels in float (rowquant.py; the
    # held-apart bar is tests/engine/test_onnx_int8.py)
    q = r.metadata["quantization"]
    assert q["activation_scales"] == "row" and q["float_outlier_channels"] > 0 and "smoothing" not in q
    assert q["weight_type"] == "QUInt8"
    out, ref, mask = embeddings(r.path, minilm_dir)
    # sentences the engine never saw, the short "Hello!" included (0.9825 before smoothing)
    assert pooled_cosines(out, ref, mask).min() >= 0.99


def test_int8_dynamic_without_smoothing_keeps_the_old_recipe(minilm_dir, minilm_fp32_onnx, tmp_path):
    r = _quantize(minilm_dir, minilm_fp32_onnx, "int8-dynamic", tmp_path, smooth_activations=False,
                  activation_scales="tensor", weight_type="QInt8", tolerances={"min_cosine": 0.98})
    assert "smoothing" not in r.metadata["quantization"] and r.metadata["quantization"]["weight_type"] == "QInt8"
    assert 0.98 <= r.metrics["cosine_min"] < 0.995
    out, ref, mask = embeddings(r.path, minilm_dir)
    assert 0.97 < pooled_cosines(out, ref, mask).min() < 0.99  # the gap smoothing closes


def test_fp16(minilm_dir, minilm_fp32_onnx, tmp_path):
    r = _quantize(minilm_dir, minilm_fp32_onnx, "fp16", tmp_path)
    assert r.metrics["max_abs_diff"] < 5e-2 and r.metrics["cosine_min"] > 0.9999
    assert 1.9 < r.metrics["compression_vs_fp32"] < 2.1
    out, ref, mask = embeddings(r.path, minilm_dir)
    assert out.dtype.name == "float32"  # keep_io_types
    assert pooled_cosines(out, ref, mask).min() > 0.9999


@pytest.mark.parametrize("method", ["MinMax", "Percentile"])
def test_int8_static_qdq(minilm_dir, minilm_fp32_onnx, tmp_path, method):
    r = _quantize(minilm_dir, minilm_fp32_onnx, "int8-static", tmp_path, calibration={"method": method})
    assert r.metadata["quantization"]["calibration_method"] == method
    assert "QuantizeLinear" in _op_types(r.path) and r.metrics["cosine_min"] >= 0.98
    out, ref, mask = embeddings(r.path, minilm_dir)
    assert pooled_cosines(out, ref, mask).min() >= 0.97


def test_int4_matmulnbits(minilm_dir, minilm_fp32_onnx, tmp_path):
    r = _quantize(minilm_dir, minilm_fp32_onnx, "int4", tmp_path, block_size=32)
    from quantyard.engine.onnx.quantize import _weight_matmuls

    # every weight MatMul became MatMulNBits (attention's activation products stay MatMul)
    assert "MatMulNBits" in _op_types(r.path) and _weight_matmuls(r.path) == []
    assert r.metrics["cosine_min"] >= 0.95 and r.size_bytes < 0.65 * minilm_fp32_onnx.size_bytes
    out, ref, mask = embeddings(r.path, minilm_dir)
    assert pooled_cosines(out, ref, mask).min() >= 0.93


def test_drift_beyond_tolerance_fails_with_numbers(minilm_dir, minilm_fp32_onnx, tmp_path):
    with pytest.raises(ValidationFailed) as err:
        _quantize(minilm_dir, minilm_fp32_onnx, "int8-dynamic", tmp_path,
                  tolerances={"max_abs_diff": 1e-6, "min_cosine": 0.999999})
    e = err.value
    assert "max abs diff" in e.message and "cosine similarity" in e.message
    assert 0.05 < e.details["max_abs_diff"] < 1.5 and 0.98 < e.details["cosine_min"] < 0.999999
    assert e.to_dict()["code"] == "validation_failed"
