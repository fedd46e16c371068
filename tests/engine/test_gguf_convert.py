"""HF Llama safetensors -> GGUF, checked against independent oracles: transformers (logits,
tokenizer), sentencepiece (vocab), llama.cpp (loading, tokenization, logits, its own quantizer)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from quantyard.engine import Cancelled, ValidationFailed, convert, parse_target
from quantyard.engine.gguf.llama_runtime import open_llama
from quantyard.engine.manifest import ENGINE_VERSION

PROMPT = "Hello world! A llama jumps over 7 lazy dogs; café and Москва are rare words."
PROVENANCE = {"source_sha256": "ab" * 32, "recipe_hash": "cd" * 32}


@pytest.fixture(scope="module")
def converted(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {q: convert(tiny_llama_dir, parse_target(f"gguf:{q}"), out, provenance=PROVENANCE)
            for q in ("F32", "F16", "BF16", "Q8_0")}


def hf_logits(model_dir: Path, text: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(path: Path, text: str):
    import llama_cpp

    llm = open_llama(model_path=str(path), logits_all=True, n_ctx=128, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        ids = llm.tokenize(text.encode(), add_bos=True)
        llm.eval(ids)
        return ids, np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def gguf_tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def gguf_fields(path: Path) -> dict:
    import gguf

    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}


def test_f32_matches_transformers(converted, tiny_llama_dir):
    import sentencepiece as spm

    hf_ids, ref = hf_logits(tiny_llama_dir, PROMPT)
    ids, got = llama_cpp_logits(converted["F32"].path, PROMPT)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_llama_dir / "tokenizer.model"))
    assert ids == hf_ids == [sp.bos_id()] + sp.encode(PROMPT)
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    assert np.abs(ref - got).max() < 0.01
    m = converted["F32"].metrics
    assert m["top1_agreement"] == 1.0 and m["max_abs_logit_diff"] < 0.01 and m["tokenization_match"]


@pytest.mark.parametrize("quant, bound", [("F16", 1e-4), ("BF16", 1e-3), ("Q8_0", 5e-3)])
def test_lower_precision_loads_and_stays_close(converted, tiny_llama_dir, quant, bound):
    _, ref = hf_logits(tiny_llama_dir, PROMPT)
    _, got = llama_cpp_logits(converted[quant].path, PROMPT)
    assert mean_kl(ref, got) < bound
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.8
    assert converted[quant].metrics["mean_kl"] < bound


def test_tensor_types_per_target(converted):
    for quant, big in (("F32", "F32"), ("F16", "F16"), ("BF16", "BF16"), ("Q8_0", "Q8_0")):
        for name, t in gguf_tensors(converted[quant].path).items():
            want = "F32" if len(t.shape) == 1 else big
            assert t.tensor_type.name == want, (quant, name)


def test_q8_0_identical_to_llama_quantize(converted, tmp_path):
    import llama_cpp

    oracle = tmp_path / "oracle-Q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(converted["F32"].path).encode(), str(oracle).encode(),
                                        ctypes.byref(params))
    assert rc == 0
    ours, theirs = gguf_tensors(converted["Q8_0"].path), gguf_tensors(oracle)
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert ours[name].data.tobytes() == t.data.tobytes(), name
    f_ours, f_theirs = gguf_fields(converted["Q8_0"].path), gguf_fields(oracle)
    for key in ("general.file_type", "general.quantization_version"):
        assert f_ours[key] == f_theirs[key]


def test_metadata_and_provenance(converted, tiny_llama_dir):
    import json

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    r = converted["Q8_0"]
    f = gguf_fields(r.path)
    assert r.path.name == f"{tiny_llama_dir.name}-Q8_0.gguf" and r.size_bytes == r.path.stat().st_size
    # no name given: the quantized file keeps the intermediate's general.name, which is the float
    # converter's (llama.cpp's derivation, test_metadata_parity.py), not the folder name
    assert f["general.architecture"] == "llama"
    assert f["general.name"] == gguf_fields(converted["F32"].path)["general.name"] != tiny_llama_dir.name
    assert f["general.file_type"] == 7 and f["general.quantization_version"] == 2
    assert f["general.quantized_by"] == "Quantyard"
    assert f["quantyard.source_sha256"] == PROVENANCE["source_sha256"]
    assert f["quantyard.recipe_hash"] == PROVENANCE["recipe_hash"]
    assert f["quantyard.engine_version"] == ENGINE_VERSION == r.engine_version
    assert f["llama.block_count"] == config["num_hidden_layers"]
    assert f["llama.embedding_length"] == config["hidden_size"]
    assert f["llama.feed_forward_length"] == config["intermediate_size"]
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.context_length"] == config["max_position_embeddings"]
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["llama.vocab_size"] == config["vocab_size"]
    assert "{% for m in messages %}" in f["tokenizer.chat_template"]
    assert r.metadata["tensor_count"] == len(gguf_tensors(r.path))
    assert r.metadata["parameter_count"] == sum(int(np.prod(t.shape)) for t in gguf_tensors(r.path).values())


def test_vocab_matches_sentencepiece(converted, tiny_llama_dir):
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_llama_dir / "tokenizer.model"))
    f = gguf_fields(converted["F32"].path)
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    # added tokens of the HF tokenizer (<unk>, <s>, </s>, all flagged special) are CONTROL with
    # score -1000, as convert_hf_to_gguf writes them; every other piece keeps SentencePiece's
    added = {0, 1, 2}
    scores, types = f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    for i in range(sp.get_piece_size()):
        assert scores[i] == pytest.approx(-1000.0 if i in added else sp.get_score(i)), i
    assert types[sp.unk_id()] == types[sp.bos_id()] == types[sp.eos_id()] == gguf.TokenType.CONTROL
    assert all(types[i] == gguf.TokenType.BYTE for i in range(sp.get_piece_size()) if sp.is_byte(i))
    assert all(types[i] == gguf.TokenType.NORMAL for i in range(sp.get_piece_size())
               if i not in added and not sp.is_byte(i))
    assert f["tokenizer.ggml.bos_token_id"] == sp.bos_id() and f["tokenizer.ggml.eos_token_id"] == sp.eos_id()
    assert f["tokenizer.ggml.add_bos_token"] is True


def test_sharded_source_gives_identical_tensors(converted, tiny_llama_sharded_dir, tmp_path):
    r = convert(tiny_llama_sharded_dir, parse_target("gguf:F32"), tmp_path)
    single, sharded = gguf_tensors(converted["F32"].path), gguf_tensors(r.path)
    assert list(single) == list(sharded)
    for name, t in single.items():
        assert t.data.tobytes() == sharded[name].data.tobytes(), name


def test_bf16_source(tiny_llama_bf16_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    r = convert(tiny_llama_bf16_dir, parse_target("gguf:BF16"), tmp_path)
    assert r.metrics["tokenization_match"]
    src = load_file(tiny_llama_bf16_dir / "model.safetensors")
    t = gguf_tensors(r.path)
    # BF16 -> BF16 must be lossless: compare the raw bits of an unpermuted tensor
    want = src["model.layers.0.mlp.down_proj.weight"].view(torch.int16).numpy().tobytes()
    assert t["blk.0.ffn_down.weight"].data.tobytes() == want


def test_cancel_from_progress_leaves_nothing(tiny_llama_dir, tmp_path):
    calls = []

    def progress(frac, message):
        calls.append(frac)
        if len(calls) == 5:
            raise Cancelled("user asked")

    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        convert(tiny_llama_dir, parse_target("gguf:Q8_0"), out, progress=progress)
    assert list(out.iterdir()) == []


def test_progress_is_monotonic(tiny_llama_dir, tmp_path):
    seen = []
    convert(tiny_llama_dir, parse_target("gguf:F16"), tmp_path, progress=lambda f, m: seen.append((f, m)))
    fracs = [f for f, _ in seen]
    assert fracs == sorted(fracs) and 0.0 <= fracs[0] and fracs[-1] >= 0.99
    assert all(isinstance(m, str) and m for _, m in seen)


def test_broken_conversion_fails_validation(tiny_llama_dir, tmp_path, monkeypatch):
    """Without the Q/K permutation the file loads but computes garbage: validation must fail it
    (an error, never a warning) and leave no file behind."""
    from quantyard.engine.gguf.archs import llama

    monkeypatch.setattr(llama, "permute_qk", lambda w, n_head: w)
    with pytest.raises(ValidationFailed) as exc:
        convert(tiny_llama_dir, parse_target("gguf:F32"), tmp_path)
    assert "max |Δlogit|" in str(exc.value) or "top-1" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_json_only_source(tiny_llama_dir, tmp_path):
    """Without tokenizer.model the SentencePiece-style tokenizer.json path (byte_fallback BPE)
    must give llama.cpp the same ids as transformers (checked inside convert, re-checked here)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    (src / "tokenizer.model").unlink()
    r = convert(src, parse_target("gguf:F32"), tmp_path / "out")
    hf_ids, _ = hf_logits(src, PROMPT)
    ids, _ = llama_cpp_logits(r.path, PROMPT)
    assert ids == hf_ids
    assert gguf_fields(r.path)["tokenizer.ggml.model"] == "llama"


def test_bytelevel_bpe_tokenizer(tiny_llama_bytelevel_dir, tmp_path):
    """GPT-2-style tokenizer.json -> tokenizer.ggml.model "gpt2" with merges; llama.cpp must
    tokenize like transformers and its F32 logits must match."""
    r = convert(tiny_llama_bytelevel_dir, parse_target("gguf:F32"), tmp_path)
    f = gguf_fields(r.path)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"]
    assert len(f["tokenizer.ggml.merges"]) > 0
    hf_ids, ref = hf_logits(tiny_llama_bytelevel_dir, PROMPT)
    ids, got = llama_cpp_logits(r.path, PROMPT)
    assert ids == hf_ids
    assert np.abs(ref - got).max() < 0.01
