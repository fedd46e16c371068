"""Tokenizers in the GGUF against the Hugging Face tokenizer, for every architecture's tiny model.

Oracles: transformers' tokenizer (ids, added tokens, flags, chat template) and llama.cpp's
tokenizer loading our file (vocab_only, fast).
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from quantyard.engine.gguf.llama_runtime import open_llama
from tests.fixtures.models import ARCH_FIXTURES

PROBES = json.loads((Path(__file__).parents[1] / "data" / "probe_strings.json").read_text(encoding="utf-8"))["strings"]
EXPECTED_PRE = {"llama": ("llama", "default"), "llama3": ("gpt2", "llama-bpe"), "mistral": ("llama", "default"),
                "qwen2": ("gpt2", "qwen2"), "qwen3": ("gpt2", "qwen2"), "gemma2": ("llama", "default"),
                "gemma3": ("llama", "default"), "phi3": ("llama", "default"), "gpt2": ("gpt2", "gpt-2")}


def fields(path: Path) -> dict:
    import gguf

    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}


def test_probe_corpus_is_broad():
    assert len(PROBES) >= 200 and len(set(PROBES)) == len(PROBES)
    for needle in ("\t", "\n", "   ", "12345", "😀", "你好", "def ", "CamelCase", "Москва"):
        assert any(needle in s for s in PROBES), needle


@pytest.mark.parametrize("family", ARCH_FIXTURES)
def test_llama_cpp_tokenizes_like_transformers(family, arch_models, arch_f32_files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(arch_models[family])
    specials = sorted({t.content for t in tok.added_tokens_decoder.values()})
    texts = PROBES + specials + [f"a{s}b {s} c" for s in specials] + ["".join(specials)]
    llm = open_llama(model_path=str(arch_f32_files[family]), vocab_only=True, verbose=False)
    try:
        mismatches = []
        for text in texts:
            want = list(tok(text).input_ids)
            got = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
            if got != want:
                mismatches.append((text, want, got))
    finally:
        llm.close()
    if tok.backend_tokenizer.normalizer is not None and "NFC" in str(tok.backend_tokenizer.normalizer):
        # Qwen's tokenizer NFC-normalises its input; llama.cpp has no NFC step. Every other string
        # must match; the ones that differ must be exactly those NFC would change.
        assert all(not unicodedata.is_normalized("NFC", t) for t, _, _ in mismatches), mismatches[:3]
        mismatches = []
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, e.g. {mismatches[:3]}"
    assert len(texts) >= 200


@pytest.mark.parametrize("family", ARCH_FIXTURES)
def test_vocab_metadata_matches_hf_tokenizer(family, arch_models, arch_f32_files):
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(arch_models[family])
    config = json.loads((arch_models[family] / "config.json").read_text())
    f = fields(arch_f32_files[family])
    model, pre = EXPECTED_PRE[family]
    assert f["tokenizer.ggml.model"] == model and f["tokenizer.ggml.pre"] == pre
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config["vocab_size"]
    # special token ids: those tokenizer_config.json declares (else config.json's *_token_id)
    tok_cfg = json.loads((arch_models[family] / "tokenizer_config.json").read_text())
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}
    for kind, key in keys.items():
        declared = tok_cfg.get(f"{kind}_token")
        declared = declared.get("content") if isinstance(declared, dict) else declared
        want = tok.convert_tokens_to_ids(declared) if declared else config.get(f"{kind}_token_id")
        assert f.get(f"tokenizer.ggml.{key}") == want, kind
    # add_bos/add_eos: what the HF tokenizer actually does to a text
    plain = tok("hello").input_ids
    adds_bos = tok.bos_token_id is not None and plain[0] == tok.bos_token_id
    assert bool(f.get("tokenizer.ggml.add_bos_token", model == "llama")) == adds_bos
    assert not f.get("tokenizer.ggml.add_eos_token", False)
    # chat template, verbatim
    assert f.get("tokenizer.chat_template") == tok.chat_template
    # added tokens: special -> CONTROL, others -> USER_DEFINED; text kept
    for tid, added in tok.added_tokens_decoder.items():
        if tid >= len(tokens):
            continue
        assert tokens[tid] == added.content, (tid, added.content)
        want = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        assert types[tid] == want, (added.content, types[tid])
    # every other real token is NORMAL (or BYTE for SentencePiece byte pieces), same text
    vocab = {i: t for t, i in tok.get_vocab().items()}
    for i, text in vocab.items():
        if i in tok.added_tokens_decoder:
            continue
        assert tokens[i] == text, (i, text)
        want = gguf.TokenType.BYTE if (model == "llama" and text.startswith("<0x")) else gguf.TokenType.NORMAL
        assert types[i] == want, (i, text)
    # ids past the tokenizer (padded embedding rows, Phi-3) are UNUSED padding
    for i in range(len(tokens)):
        if i not in vocab:
            assert types[i] == gguf.TokenType.UNUSED and tokens[i].startswith("[PAD")
    if model == "gpt2":
        assert len(f["tokenizer.ggml.merges"]) > 0


def test_qwen3_think_tokens_are_user_defined(arch_f32_files, arch_models):
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(arch_models["qwen3"])
    f = fields(arch_f32_files["qwen3"])
    assert f["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids("<think>")] == gguf.TokenType.USER_DEFINED
    assert f["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL


def test_pre_tokenizer_recognised_from_structure():
    from quantyard.engine.gguf.vocab import LLAMA3_REGEX, QWEN2_REGEX, pre_tokenizer_from_structure

    def split(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}}

    assert pre_tokenizer_from_structure(split(LLAMA3_REGEX)) == "llama-bpe"
    assert pre_tokenizer_from_structure(split(QWEN2_REGEX)) == "qwen2"
    assert pre_tokenizer_from_structure(split("\\s+")) is None
    assert pre_tokenizer_from_structure({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}
    assert pre_tokenizer_from_structure(smollm) == "smollm"


def test_pre_tokenizer_hash_table_is_llama_cpps():
    from quantyard.engine.gguf.pre_hashes import PRE_TOKENIZER_HASHES

    # a few entries people rely on (llama.cpp's convert_hf_to_gguf.py)
    assert PRE_TOKENIZER_HASHES["0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5"] == "llama-bpe"
    assert PRE_TOKENIZER_HASHES["3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454"] == "gpt-2"
    assert PRE_TOKENIZER_HASHES["e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"] == "qwen2"
    assert PRE_TOKENIZER_HASHES["855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"] == "smollm"


# ---- tokenizer.json against config.json, from the parsed JSON (issue 10) ----------------------

def _bytelevel_with(tmp_path: Path, tokenizer_json: bytes) -> Path:
    import shutil

    from tests.fixtures.models import cached_model, make_tiny_llama_bytelevel

    root = tmp_path / "model"
    shutil.copytree(cached_model("tiny-llama-bytelevel", make_tiny_llama_bytelevel), root)
    (root / "tokenizer.json").write_bytes(tokenizer_json)
    return root


def test_a_tokenizer_far_past_vocab_size_is_refused_before_transformers_builds_it(tmp_path, monkeypatch):
    """250k tokens against config.json's 512: refused naming tokenizer.json and model.vocab, at
    preflight and at convert, without transformers building the tokenizer (which took 10-15 s)."""
    import transformers

    from quantyard import engine
    from quantyard.engine.errors import InvalidModel
    from tests.security.hostile import huge_tokenizer_json

    root = _bytelevel_with(tmp_path, huge_tokenizer_json(250_000))
    assert json.loads((root / "config.json").read_text())["vocab_size"] == 512

    def built(*args, **kwargs):
        raise AssertionError("the tokenizer was built before its ids were checked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", built)
    for call in (lambda: engine.preflight(root, ["gguf:F32"]), lambda: engine.convert(root, "gguf:F32", tmp_path / "out")):
        with pytest.raises(InvalidModel) as info:
            call()
        message = str(info.value)
        assert message.startswith("tokenizer.json: model.vocab has token id 249999 (250000 tokens)"), message
        assert "vocab_size 512" in message and str(tmp_path) not in message
        assert info.value.details["file"] == "tokenizer.json" and info.value.details["field"] == "model.vocab"


@pytest.mark.parametrize("tok_json,field,words", [
    ({"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": [{"id": 600, "content": "<x>"}]},
     "added_tokens", ("token id 600", "vocab_size 512")),
    ({"model": {"type": "BPE", "vocab": {"a": 0, "b": "1"}}}, "model.vocab", ("not a non-negative integer",)),
    ({"model": {"type": "BPE", "vocab": {"a": -1}}}, "model.vocab", ("not a non-negative integer",)),
    ({"model": {"type": "BPE", "vocab": {"a": True}}}, "model.vocab", ("not a non-negative integer",)),
    ({"model": {"type": "Unigram", "vocab": [["a", 0.0]] * 513}}, "model.vocab", ("token id 512",)),
    ({"model": {"type": "BPE", "vocab": {}}, "added_tokens": [{"content": "<x>"}]}, "added_tokens",
     ("not a non-negative integer",)),
    ({"model": {"type": "BPE", "vocab": {}}, "added_tokens": {"id": 1}}, "added_tokens", ("not a list",)),
    ({"model": ["BPE"]}, "model", ("not an object",)),
])
def test_token_ids_checked_from_the_json(tok_json, field, words):
    from quantyard.engine.errors import InvalidModel
    from quantyard.engine.gguf.vocab import check_token_ids

    with pytest.raises(InvalidModel) as info:
        check_token_ids(tok_json, 512)
    assert str(info.value).startswith(f"tokenizer.json: {field} "), str(info.value)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert info.value.details == {**info.value.details, "file": "tokenizer.json", "field": field}


def test_genuine_tokenizers_pass_the_id_check(arch_models):
    """Every fixture family's own tokenizer.json fits its config.json (the check refuses no real
    model), and the same file against one vocab_size fewer than its largest id is refused."""
    from quantyard.engine.errors import InvalidModel
    from quantyard.engine.gguf.vocab import _read_json, check_token_ids
    from tests.fixtures.models import cached_model, make_tiny_llama_bytelevel

    roots = {**arch_models, "bytelevel": cached_model("tiny-llama-bytelevel", make_tiny_llama_bytelevel)}
    checked = 0
    for root in roots.values():
        tok_json = _read_json(root / "tokenizer.json")
        if not tok_json:
            continue
        config = json.loads((root / "config.json").read_text())
        check_token_ids(tok_json, config.get("vocab_size") or config["text_config"]["vocab_size"])
        top = max([*tok_json["model"]["vocab"].values(), *(t["id"] for t in tok_json.get("added_tokens", []))])
        with pytest.raises(InvalidModel):
            check_token_ids(tok_json, top)
        checked += 1
    assert checked >= 3, checked
