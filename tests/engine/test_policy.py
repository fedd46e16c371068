"""llama-quantize's per-tensor type choice, checked against llama.cpp's own code.

The oracle is llama_quant_compute_types from the libllama that llama-cpp-python ships (the same
function llama-quantize runs), fed synthetic models: many layer counts, GQA ratios, MoE with 8
experts, a 70B-shaped Llama, Falcon, Phi-3 (fused QKV), GPT-2 (position embeddings), tied
embeddings and rows that are not a multiple of 256.
"""

from __future__ import annotations

import pytest

from quantyard.engine.gguf import policy
from quantyard.engine.gguf.ggml_types import FILE_TYPES, GGML_TYPES, GGML_TYPES_BY_ID

from ._llama_tools import llama_cpp_types


def _dense(n_layer: int, *, hidden: int = 256, ff: int = 512, kv: int = 128, vocab: int = 512, tied=False,
           qkv: bool = False, gate: bool = True, pos: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    t = [("token_embd.weight", (hidden, vocab)), ("output_norm.weight", (hidden,))]
    if not tied:
        t.append(("output.weight", (hidden, vocab)))
    if pos:
        t.append(("position_embd.weight", (hidden, 1024)))
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", (hidden,)), (p + "ffn_norm.weight", (hidden,)),
              (p + "attn_output.weight", (hidden, hidden)), (p + "ffn_up.weight", (hidden, ff)),
              (p + "ffn_down.weight", (ff, hidden))]
        t += [(p + "attn_qkv.weight", (hidden, hidden + 2 * kv))] if qkv else [
            (p + "attn_q.weight", (hidden, hidden)), (p + "attn_k.weight", (hidden, kv)),
            (p + "attn_v.weight", (hidden, kv))]
        if gate:
            t.append((p + "ffn_gate.weight", (hidden, ff)))
    return t


def _moe(n_layer: int, n_expert: int, hidden: int = 256, ff: int = 256) -> list[tuple[str, tuple[int, ...]]]:
    t = [x for x in _dense(n_layer, hidden=hidden, ff=ff, kv=64) if "ffn_" not in x[0] or "norm" in x[0]]
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [(p + "ffn_gate_inp.weight", (hidden, n_expert)), (p + "ffn_gate_exps.weight", (hidden, ff, n_expert)),
              (p + "ffn_up_exps.weight", (hidden, ff, n_expert)), (p + "ffn_down_exps.weight", (ff, hidden, n_expert))]
    return t


MODELS = {
    # name: (arch, n_layer, n_head, n_head_kv, n_expert, tensors)
    "llama-2l-gqa2": ("llama", 2, 4, 2, 0, _dense(2)),
    "llama-8l-gqa4-ff384-tied": ("llama", 8, 8, 2, 0, _dense(8, ff=384, kv=64, tied=True)),
    "llama-32l-gqa4": ("llama", 32, 32, 8, 0, _dense(32, kv=64)),
    "llama-70b-shape": ("llama", 80, 64, 8, 0, _dense(80, kv=32)),
    "llama-80l-no-gqa": ("llama", 80, 8, 8, 0, _dense(80, kv=256)),
    "llama-hidden-384": ("llama", 4, 6, 6, 0, _dense(4, hidden=384, ff=768, kv=384)),
    "qwen2-24l-gqa8": ("qwen2", 24, 8, 1, 0, _dense(24, kv=32)),
    "mixtral-8x": ("llama", 4, 8, 2, 8, _moe(4, 8)),
    "moe-4x": ("qwen2moe", 3, 8, 8, 4, _moe(3, 4)),
    "falcon": ("falcon", 16, 8, 1, 0, _dense(16, qkv=True, gate=False)),
    "phi3": ("phi3", 6, 8, 8, 0, _dense(6, qkv=True, gate=False, kv=256)),
    "gpt2": ("gpt2", 4, 4, 4, 0, _dense(4, qkv=True, gate=False, kv=256, tied=True, pos=True)),
    "gemma2-tied": ("gemma2", 6, 8, 4, 0, _dense(6, tied=True)),
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_types_match_llama_cpp(model):
    arch, n_layer, n_head, n_head_kv, n_expert, tensors = MODELS[model]
    order = policy.llama_order([n for n, _ in tensors])
    shapes = dict(tensors)
    info = policy.ModelInfo(arch, n_layer, n_head, n_head_kv, n_expert,
                            is_70b=policy._is_70b(arch, n_layer, n_head, n_head_kv))
    mismatches = []
    for q, ft in FILE_TYPES.items():
        want = llama_cpp_types(arch, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_expert=n_expert,
                               tensors=[(n, shapes[n], 0) for n in order], ftype=ft.llama_ftype)
        got = policy.plan_types([policy.TensorInfo(n, shapes[n], "F32") for n in order], info, q)
        assert [c.name for c in got] == order
        mismatches += [(q, c.name, GGML_TYPES_BY_ID[w].name, c.type_name)
                       for c, w in zip(got, want, strict=False) if GGML_TYPES[c.type_name].id != w]
    assert not mismatches, mismatches[:20]


def test_model_info_from_gguf_fields():
    fields = {"general.architecture": "llama", "llama.block_count": 80, "llama.attention.head_count": 64,
              "llama.attention.head_count_kv": 8}
    info = policy.ModelInfo.from_fields(fields)
    assert (info.n_layer, info.n_gqa, info.n_expert, info.is_70b) == (80, 8, 0, True)
    # per-layer arrays (some architectures store head counts per layer): llama.cpp reads layer 0
    fields["llama.attention.head_count_kv"] = [4, 8, 8]
    assert policy.ModelInfo.from_fields(fields).n_gqa == 16
    # no head_count_kv key: no GQA
    assert policy.ModelInfo.from_fields({"general.architecture": "gpt2", "gpt2.block_count": 2,
                                         "gpt2.attention.head_count": 4}).n_gqa == 1


def test_70b_detection_follows_load_hparams():
    """llama_quant_model_from_metadata (the oracle's mock) infers 70B for Llama only, but the real
    llama-quantize loads hparams per architecture (src/models/{llama,qwen2,deci,olmo,jais2}.cpp)."""
    assert policy._is_70b("llama", 80, 64, 8) and not policy._is_70b("llama", 80, 64, 64)
    assert policy._is_70b("qwen2", 80, 64, 8) and policy._is_70b("jais2", 68, 8, 8)
    assert not policy._is_70b("qwen3", 80, 64, 8) and not policy._is_70b("llama", 32, 32, 8)


def test_fallbacks_and_never_quantized():
    assert policy.fallback("Q4_K", 384) == "Q5_0"
    assert policy.fallback("Q5_K", 384) == "Q5_1"
    assert policy.fallback("Q6_K", 384) == "Q8_0"
    assert policy.fallback("Q2_K", 384) == "Q4_0" and policy.fallback("Q3_K", 384) == "Q4_0"
    assert policy.fallback("IQ2_XXS", 384) == "IQ4_NL" and policy.fallback("IQ4_XS", 96) == "IQ4_NL"
    assert policy.fallback("Q4_K", 100) == "F16" and policy.fallback("Q8_0", 100) == "F16"
    assert policy.fallback("Q4_K", 512) == "Q4_K"
    for name, ne in (("blk.0.attn_norm.weight", (256,)), ("blk.0.ffn_gate_inp.weight", (256, 8)),
                     ("position_embd.weight", (256, 1024)), ("token_types.weight", (256, 2)),
                     ("blk.0.attn_q.bias", (256, 4)), ("blk.0.ffn_up.weight", (256, 1))):
        assert not policy.allows_quantization_ne(name, ne), name
    assert policy.allows_quantization_ne("blk.0.ffn_up.weight", (256, 512))


def test_requires_imatrix():
    assert policy.requires_imatrix("blk.0.attn_q.weight", "IQ2_XXS", "IQ2_XXS")
    assert not policy.requires_imatrix("output.weight", "IQ2_XXS", "IQ2_XXS")
    assert policy.requires_imatrix("blk.0.ffn_up.weight", "Q2_K", "Q2_K_S")
    assert not policy.requires_imatrix("blk.0.ffn_up.weight", "Q2_K", "Q2_K")
    assert not policy.requires_imatrix("blk.0.ffn_up.weight", "IQ4_XS", "IQ4_XS")


def test_converter_policy_unchanged():
    """convert_hf_to_gguf's rule, used by the HF -> GGUF converter, is not llama-quantize's."""
    assert policy.tensor_type("output.weight", (512, 256), "Q8_0") == "Q8_0"
    assert policy.tensor_type("blk.0.ffn_down.weight", (256, 100), "Q8_0") == "F16"
    assert policy.tensor_type("blk.0.attn_norm.weight", (256,), "F16") == "F32"
    assert policy.tensor_type("token_embd.weight", (512, 256), "BF16") == "BF16"
