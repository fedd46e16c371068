"""Decoder LLMs through the ONNX engine's front door (convert_onnx / quantize_from_fp32 /
preflight_onnx): every artifact validated by the engine, then re-checked here with the test's own
transformers oracle (default attention, prompts the engine never saw)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from quantyard.engine.errors import UnsupportedTarget, ValidationFailed
from quantyard.engine.spec import TargetSpec
from tests.fixtures.models import arch_model

ORACLE_PROMPTS = ["hello world the llama", "for i in range ( 10 ) : print ( i )"]
NEW_TOKENS = 12
FAMILIES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """{family: (model dir, fp32 ConversionResult)}, each converted once through convert_onnx."""
    from quantyard.engine.onnx import convert_onnx

    out = {}
    for family in FAMILIES:
        model_dir = arch_model(family)
        seen = []
        result = convert_onnx(model_dir, TargetSpec("onnx", "fp32"), tmp_path_factory.mktemp(family),
                              progress=lambda f, m, seen=seen: seen.append(f))
        assert seen[-1] == 1.0 and seen == sorted(seen)
        out[family] = (model_dir, result)
    return out


def _oracle(model_dir, onnx_path):
    """(ORT greedy sequences, transformers greedy sequences) on the oracle prompts, left-padded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantyard.engine.onnx.generate import greedy_generate

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(ORACLE_PROMPTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()
    with torch.no_grad():
        want = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id).numpy()
    got = greedy_generate(onnx_path, enc["input_ids"].numpy(), enc["attention_mask"].numpy(),
                          max_new_tokens=NEW_TOKENS, eos_token_id=model.generation_config.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    return got.sequences, want


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_validated_and_generation_equals_transformers(fp32, family):
    model_dir, r = fp32[family]
    m, meta = r.metrics, r.metadata
    assert r.path.name == f"{model_dir.name}-fp32.onnx" and r.quantization == "fp32"
    assert m["max_abs_diff"] < 1e-3 and m["cosine_min"] > 0.99999
    assert m["generation_token_agreement"] == 1.0 and m["generation_identical"] is True
    assert m["generation_new_tokens"] == 20 and m["compression_vs_fp32"] == 1.0
    for key in ("latency_ms_p50", "latency_ms_p90", "tokens_per_s", "prefill_latency_ms_p50", "size_bytes"):
        assert m[key] > 0
    assert meta["task"] == "text-generation" and meta["architecture"] == FAMILIES[family]
    assert meta["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert meta["outputs"] == ["logits"] + [f"present.{i}.{kv}" for i in range(meta["layers"]) for kv in ("key", "value")]
    assert meta["layers"] == 2 and meta["exporter"].startswith("torch.onnx dynamo")
    assert meta["files"] == [r.path.name]
    got, want = _oracle(model_dir, r.path)
    np.testing.assert_array_equal(got, want)


# The tiny models' random weights are chaotic under 4-bit rounding (the first greedy token flips
# on most prompts: agreement ~0.03, logits cosine ~0.9), so int4 runs here with tolerances of its
# own; the defaults are set on a trained model (SmolLM2, test at the end of this file).
TINY_INT4 = {"min_cosine": 0.8, "min_token_agreement": 0.0}


@pytest.mark.parametrize("quantization, ops, compression, tolerances", [
    ("int8-dynamic", {"MatMulNBits"}, (2.0, 4.5), None),
    ("int4", {"MatMulNBits", "GatherBlockQuantized"}, (4.0, 8.0), TINY_INT4),
    ("fp16", set(), (1.8, 2.1), None),
])
def test_quantized_from_shared_fp32(fp32, tmp_path, quantization, ops, compression, tolerances):
    from quantyard.engine.onnx import quantize_from_fp32
    from quantyard.engine.onnx.decoder_options import DECODER_TOLERANCES

    model_dir, base = fp32["llama"]
    params = {"tolerances": tolerances} if tolerances else {}
    r = quantize_from_fp32(model_dir, base.path, TargetSpec("onnx", quantization, params), tmp_path)
    m = r.metrics
    assert compression[0] < m["compression_vs_fp32"] < compression[1]
    assert m["fp32_size_bytes"] == base.size_bytes and r.size_bytes == r.path.stat().st_size
    assert ops <= _ops(r.path)
    tol = {**DECODER_TOLERANCES[quantization], **(tolerances or {})}
    assert m["generation_token_agreement"] >= tol["min_token_agreement"]
    assert m["max_abs_diff"] <= tol["max_abs_diff"] and m["cosine_min"] >= tol["min_cosine"]
    assert m["tolerance_min_token_agreement"] == tol["min_token_agreement"]
    assert m["tokens_per_s"] > 0 and r.metadata["quantization"]
    # past/present and logits stay float32 at the I/O, so one generation loop drives every artifact
    io = {v["name"]: v["dtype"] for v in r.metadata["io"]}
    assert io["logits"] == "float32" and io["past_key_values.0.key"] == "float32"
    got, want = _oracle(model_dir, r.path)
    assert got.shape == want.shape


def test_tied_embeddings_int4_qwen2(fp32, tmp_path):
    from quantyard.engine.onnx import quantize_from_fp32

    model_dir, base = fp32["qwen2"]
    target = TargetSpec("onnx", "int4", {"block_size": 64, "quantize_embeddings": False, "tolerances": TINY_INT4})
    r = quantize_from_fp32(model_dir, base.path, target, tmp_path)
    q = r.metadata["quantization"]
    assert q["block_size"] == 64 and q["untied_transposed_weights"] == 1 and q["lm_head_quantized"]
    # the head shared with the embedding got its own 4-bit copy; the table stays float
    assert "MatMulNBits" in _ops(r.path) and "GatherBlockQuantized" not in _ops(r.path)
    assert 1.5 < r.metrics["compression_vs_fp32"] < 4.5
    assert r.metrics["tolerance_min_token_agreement"] == 0.0


def test_classic_quantize_dynamic_still_offered(fp32, tmp_path):
    from quantyard.engine.onnx import quantize_from_fp32

    model_dir, base = fp32["gpt2"]  # GPT-2's Gemm layers are rewritten as MatMul first
    r = quantize_from_fp32(model_dir, base.path, TargetSpec("onnx", "int8-dynamic", {"int8_method": "quantize_dynamic"}),
                           tmp_path)
    q = r.metadata["quantization"]
    assert q["method"] == "quantize_dynamic" and q["gemm_to_matmul"] == 8 and q["untied_transposed_weights"] == 1
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= _ops(r.path) and "Gemm" not in _ops(r.path)
    assert 3.0 < r.metrics["compression_vs_fp32"] < 4.5


def test_too_tight_tolerance_fails_with_the_measured_numbers(fp32, tmp_path):
    from quantyard.engine.onnx import quantize_from_fp32

    model_dir, base = fp32["gpt2"]
    target = TargetSpec("onnx", "int8-dynamic", {"tolerances": {"max_abs_diff": 1e-6}})
    with pytest.raises(ValidationFailed) as err:
        quantize_from_fp32(model_dir, base.path, target, tmp_path)
    d = err.value.details
    assert d["max_abs_diff"] > 1e-6 and d["tolerance_max_abs_diff"] == 1e-6
    assert "max abs diff" in err.value.message and 0 <= d["generation_token_agreement"] <= 1


def test_tampered_graph_fails_validation(fp32, tmp_path):
    """An fp32 graph whose output head was corrupted: the fp16 made from it is caught against
    the PyTorch source (never against the fp32 file)."""
    from onnx import numpy_helper

    from quantyard.engine.onnx import quantize_from_fp32
    from quantyard.engine.onnx.decoder_quantize import lm_head_node

    model_dir, base = fp32["llama"]
    model = onnx.load(str(base.path))
    head = next(n for n in model.graph.node if n.name == lm_head_node(base.path))
    weights = {t.name: t for t in model.graph.initializer}
    tensor = weights[next(i for i in head.input if i in weights)]
    values = numpy_helper.to_array(tensor)
    rng = np.random.default_rng(0)
    tensor.CopyFrom(numpy_helper.from_array(values[:, rng.permutation(values.shape[1])], tensor.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    with pytest.raises(ValidationFailed) as err:
        quantize_from_fp32(model_dir, tampered, TargetSpec("onnx", "fp16"), tmp_path / "out")
    d = err.value.details
    assert d["max_abs_diff"] > 0.5 and d["cosine_min"] < 0.999
    assert d["generation_token_agreement"] < 0.5 and d["generated_tokens"] != d["expected_tokens"]


def test_int8_static_refused_at_preflight_and_convert(tmp_path):
    from quantyard.engine.onnx import convert_onnx, preflight_onnx

    model_dir = arch_model("llama")
    for call in (lambda: preflight_onnx(model_dir, [TargetSpec("onnx", "int8-static")]),
                 lambda: convert_onnx(model_dir, TargetSpec("onnx", "int8-static"), tmp_path)):
        with pytest.raises(UnsupportedTarget) as err:
            call()
        assert "int8-static" in err.value.message and "int8-dynamic" in err.value.message
        assert "decode" in err.value.message
    assert not list(tmp_path.iterdir())  # refused before any work


def test_preflight_is_light_and_estimates_decoders():
    """Preflight reads headers only: no torch / onnxruntime import, sizes ordered by scheme."""
    model_dir = arch_model("qwen2")
    code = (
        "import json, sys\n"
        "from quantyard.engine.onnx import preflight_onnx\n"
        "from quantyard.engine.spec import TargetSpec\n"
        f"r = preflight_onnx({str(model_dir)!r}, [TargetSpec('onnx', q) for q in ('fp32', 'fp16', 'int8-dynamic', 'int4')])\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'transformers') if m in sys.modules]\n"
        "print(json.dumps({'est': r.estimates, 'arch': r.architecture, 'heavy': heavy}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert out["arch"] == "Qwen2ForCausalLM" and out["heavy"] == []
    sizes = [out["est"][f"onnx:{q}"]["size_bytes"] for q in ("fp32", "fp16", "int8-dynamic", "int4")]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("params, word", [
    ({"new_tokens": 0}, "new_tokens"), ({"tolerances": {"min_token_agreement": "x"}}, "min_token_agreement"),
    ({"tolerances": {"top_k": 1}}, "tolerances"), ({"block_size": 48}, "block_size"),
    ({"quantize_lm_head": "yes"}, "quantize_lm_head"),
])
def test_bad_decoder_params_refused(params, word):
    from quantyard.engine.onnx import preflight_onnx

    with pytest.raises(UnsupportedTarget) as err:
        preflight_onnx(arch_model("gpt2"), [TargetSpec("onnx", "int4", params)])
    assert word in err.value.message
