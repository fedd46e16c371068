"""Per-tensor type overrides (params.tensor_types) against llama-quantize --tensor-type.

Oracle: the llama-quantize binary built from llama.cpp (scripts/build-llama-tools.sh), given the
same PATTERN=TYPE arguments on the same F32 GGUF; our file must hold the same tensor types and
bytes. The cases exercise llama.cpp's rules around overrides: first match wins, a pattern is
searched (not matched whole) and lowercased, an overridden tensor does not advance the mixture's
attn_v/ffn_down counters (so the *next* layer's rule changes), the row fallback still applies
(Q6_K on 384-wide rows -> Q8_0), and norms are never touched.
"""

from __future__ import annotations

import pytest

from quantyard.engine import UnsupportedTarget, convert, parse_target
from quantyard.engine.gguf.quantize import estimate_size, quantize_gguf

from ._llama_tools import locate_llama_tools, run_tool
from .test_quantize import assert_same_tensors, deep_llama_dir  # noqa: F401  (fixture)

CASES = {
    # deep: 8 layers, 384-wide FFN. blk.0.attn_v overridden -> layer 1 sees the counter at 0
    "q4km-counters": ("deep", "Q4_K_M", ["blk\\.0\\.attn_v=q5_k", "BLK\\.[1-3]\\.FFN_DOWN=Q6_K",
                                         "ffn_down=q8_0", "token_embd=q4_k", "attn_output\\.weight$=q3_k"]),
    "q3ks-mixed": ("tiny", "Q3_K_S", ["attn_[qk]=q8_0", "ffn_(up|gate)=q5_0", "norm=q4_0", "blk.1=iq4_nl"]),
}


@pytest.fixture(scope="module")
def f32_models(tiny_llama_dir, deep_llama_dir, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("tt")
    return {k: convert(p, parse_target("gguf:F32"), d / k).path
            for k, p in (("tiny", tiny_llama_dir), ("deep", deep_llama_dir))}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_llama_quantize_tensor_type(f32_models, tmp_path, case):
    bin_dir = locate_llama_tools()
    model, quantization, args = CASES[case]
    overrides = {a.split("=")[0]: a.split("=")[1] for a in args}  # dicts keep order: first match wins
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    report = quantize_gguf(f32_models[model], ours, quantization, tensor_types=overrides, nthread=2)
    cli = [x for a in args for x in ("--tensor-type", a)]
    run_tool(bin_dir, "llama-quantize", *cli, f32_models[model], ref, quantization, "2")
    assert_same_tensors(ours, ref)
    assert estimate_size(f32_models[model], quantization, tensor_types=overrides) == report.size_bytes
    plain = quantize_gguf(f32_models[model], tmp_path / "plain.gguf", quantization, nthread=2)
    assert plain.tensor_types != report.tensor_types  # the overrides changed something


def test_spec_refuses_bad_tensor_types():
    def target(tt, q="Q4_K_M"):
        return parse_target({"format": "gguf", "quantization": q, "params": {"tensor_types": tt}})

    assert target({"ATTN_V": "q8_0"}).params["tensor_types"] == {"ATTN_V": "q8_0"}
    for bad, words in (({"attn_v": "q9_k"}, "valid ggml types"), ({"(a+)+": "q8_0"}, "regex subset"),
                       ({"a*b*c*d*e*": "q8_0"}, "quantifiers"), ({"x" * 200: "q8_0"}, "longer than"),
                       ("attn_v=q8_0", "must be an object"), ({f"p{i}": "q8_0" for i in range(65)}, "at most 64"),
                       ({"[": "q8_0"}, "not a valid regex")):
        with pytest.raises(UnsupportedTarget, match=words):
            target(bad)


def test_float_target_refuses_overrides(f32_models, tmp_path):
    with pytest.raises(UnsupportedTarget, match="quantized GGUF targets"):
        quantize_gguf(f32_models["tiny"], tmp_path / "x.gguf", "F16", tensor_types={"attn_v": "q8_0"})
