"""Every supported architecture: HF folder -> GGUF F32 -> llama.cpp, against transformers.

Oracles are independent of our code: transformers computes the reference logits and ids from the
HF folder, llama.cpp (llama-cpp-python) loads and runs our file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantyard.engine import UnsupportedArchitecture, ValidationFailed, manifest, preflight
from quantyard.engine.gguf.llama_runtime import open_llama
from quantyard.engine.hf.source import open_source
from tests.fixtures.models import ARCH_FIXTURES

PROMPT = "Hello world! A llama jumps over 7 lazy dogs; café and Москва are rare words. def f(x): return 42"
GGUF_ARCH = {"llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "gpt2": "gpt2"}


@pytest.fixture(scope="module")
def f32_files(arch_models, tmp_path_factory) -> dict[str, Path]:
    from quantyard.engine.gguf.converter import write_float_gguf

    out = tmp_path_factory.mktemp("arch-f32")
    files = {}
    for family, src in arch_models.items():
        files[family] = out / f"{family}.gguf"
        write_float_gguf(open_source(src), files[family], "F32",
                         provenance={"source_sha256": "ab" * 32, "recipe_hash": "cd" * 32})
    return files


def hf_run(model_dir: Path, text: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return list(ids), model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_run(path: Path, text: str):
    import llama_cpp

    llm = open_llama(model_path=str(path), logits_all=True, n_ctx=128, n_batch=128, n_ubatch=128,
                          verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.eval(ids)
        return list(ids), np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def fields(path: Path) -> dict:
    import gguf

    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}


def tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("family", ARCH_FIXTURES)
def test_f32_logits_match_transformers(family, arch_models, f32_files):
    hf_ids, ref = hf_run(arch_models[family], PROMPT)
    ids, got = llama_cpp_run(f32_files[family], PROMPT)
    assert ids == hf_ids
    diff = float(np.abs(ref - got).max())
    assert (ref.argmax(-1) == got.argmax(-1)).all(), family
    assert diff < 0.01, (family, diff)
    assert ref.std() > 0.5, "logits are too flat for the comparison to mean anything"
    assert fields(f32_files[family])["general.architecture"] == GGUF_ARCH[family]


def test_manifest_lists_exactly_the_implemented_architectures():
    from quantyard.engine.gguf import archs

    assert manifest.supported_architectures("gguf") == list(archs.ARCHITECTURES)
    assert set(archs.ARCHITECTURES) == {
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
        "Gemma3ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel"}


@pytest.mark.parametrize("arch", ["FalconForCausalLM", "Gemma3ForConditionalGeneration", "BertModel"])
def test_other_architectures_fail_preflight(arch, arch_models, tmp_path):
    import json
    import shutil

    src = tmp_path / "m"
    shutil.copytree(arch_models["llama"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = [arch]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture) as exc:
        preflight(src, ["gguf:F32"])
    for name in manifest.supported_architectures("gguf"):
        assert name in str(exc.value)


def test_tensor_layouts_follow_llama_cpp(arch_models, f32_files):
    """The transforms llama.cpp's converter applies, checked on the files against the sources."""
    from safetensors.numpy import load_file

    # GPT-2: Conv1D weights transposed, no output tensor (tied to token_embd)
    gpt2_src = load_file(arch_models["gpt2"] / "model.safetensors")
    t = tensors(f32_files["gpt2"])
    w = gpt2_src["transformer.h.0.attn.c_attn.weight"]  # (in, out)
    assert np.array_equal(t["blk.0.attn_qkv.weight"].data, w.T)
    assert "output.weight" not in t
    # Phi-3: fused qkv and gate_up kept fused, as llama.cpp expects
    p = tensors(f32_files["phi3"])
    assert tuple(p["blk.0.attn_qkv.weight"].data.shape) == (3 * 256, 256)
    assert tuple(p["blk.0.ffn_up.weight"].data.shape) == (2 * 512, 256)
    # Gemma: norms stored +1, embedding = output, no lm_head
    for family in ("gemma2", "gemma3"):
        src = load_file(arch_models[family] / "model.safetensors")
        g = tensors(f32_files[family])
        np.testing.assert_array_equal(g["blk.0.attn_norm.weight"].data,
                                      src["model.layers.0.input_layernorm.weight"] + np.float32(1))
        assert "output.weight" not in g
    # Qwen3: per-head q/k norms
    q = tensors(f32_files["qwen3"])
    assert tuple(q["blk.0.attn_q_norm.weight"].data.shape) == (64,)
    # Llama 3 rope scaling: rope_freqs = unscaled / scaled frequencies from transformers
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.from_pretrained(arch_models["llama3"])
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    plain = 1.0 / (500000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64))
    np.testing.assert_allclose(tensors(f32_files["llama3"])["rope_freqs.weight"].data, plain / scaled.double().numpy(),
                               rtol=1e-5)


def test_hparams_keys(arch_models, f32_files):
    g2 = fields(f32_files["gemma2"])
    assert g2["gemma2.attn_logit_softcapping"] == pytest.approx(50.0)
    assert g2["gemma2.final_logit_softcapping"] == pytest.approx(30.0)
    assert g2["gemma2.attention.sliding_window"] == 4096
    assert g2["gemma2.attention.key_length"] == 64
    g3 = fields(f32_files["gemma3"])
    assert g3["gemma3.rope.freq_base"] == pytest.approx(1_000_000.0)
    assert g3["gemma3.rope.freq_base_swa"] == pytest.approx(10_000.0)
    assert g3["gemma3.attention.sliding_window"] == 4096
    ph = fields(f32_files["phi3"])
    assert ph["phi3.rope.scaling.original_context_length"] == 512 and ph["phi3.attention.sliding_window"] == 0
    assert ph["phi3.rope.dimension_count"] == 64
    gp = fields(f32_files["gpt2"])
    assert gp["gpt2.feed_forward_length"] == 1024 and gp["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    q2 = fields(f32_files["qwen2"])
    assert q2["qwen2.rope.freq_base"] == pytest.approx(1e6) and q2["qwen2.attention.head_count_kv"] == 2
    assert fields(f32_files["mistral"])["llama.attention.key_length"] == 64


def test_float_outtypes_and_provenance(arch_models, tmp_path):
    from quantyard.engine.gguf.converter import write_float_gguf
    from quantyard.engine.manifest import ENGINE_VERSION

    prov = {"source_url": "https://huggingface.co/acme/tiny-qwen", "base_model": "acme/tiny-qwen-base",
            "source_sha256": "ef" * 32, "recipe_hash": "12" * 32, "name": "tiny-qwen"}
    for outtype in ("F16", "BF16"):
        path = tmp_path / f"q-{outtype}.gguf"
        plans = write_float_gguf(open_source(arch_models["qwen2"]), path, outtype, provenance=prov)
        t = tensors(path)
        assert [p.name for p in plans] == list(t)
        for name, tensor in t.items():
            want = "F32" if len(tensor.shape) == 1 else outtype
            assert tensor.tensor_type.name == want, name
    f = fields(path)
    assert f["general.name"] == "tiny-qwen" and f["general.quantized_by"] == "Quantyard"
    assert f["general.source.url"] == prov["source_url"]
    assert f["general.base_model.count"] == 1 and f["general.base_model.0.name"] == "tiny-qwen-base"
    assert f["general.base_model.0.organization"] == "acme"
    assert f["general.base_model.0.repo_url"] == "https://huggingface.co/acme/tiny-qwen-base"
    assert f["general.file_type"] == 32
    assert f["quantyard.source_sha256"] == prov["source_sha256"] and f["quantyard.recipe_hash"] == prov["recipe_hash"]
    assert f["quantyard.engine_version"] == ENGINE_VERSION
    with pytest.raises(ValueError):
        write_float_gguf(open_source(arch_models["qwen2"]), tmp_path / "x.gguf", "Q8_0")


def test_validate_gguf_takes_thresholds(arch_models, f32_files):
    from quantyard.engine.gguf.validate import validate_gguf

    m = validate_gguf(f32_files["gemma3"], arch_models["gemma3"], max_mean_kl=1e-5, min_top1=1.0,
                      max_abs_logit_diff=0.01)
    assert m["top1_agreement"] == 1.0 and m["tokenization_match"] and m["special_tokens_match"]
    with pytest.raises(ValidationFailed, match="max \\|Δlogit\\|"):
        validate_gguf(f32_files["gemma3"], arch_models["gemma3"], "F32", max_mean_kl=1.0, min_top1=0.0,
                      max_abs_logit_diff=1e-9)
