"""Tokenizer -> tokenizer.ggml.* metadata, following llama.cpp's converter (conversion/base.py).

Three source kinds, tried in llama.cpp's order:
- tokenizer.model (SentencePiece)                    -> model "llama", scores + token types
- tokenizer.json BPE with byte_fallback (SPM-style)  -> model "llama" via gguf's LlamaHfVocab
- tokenizer.json byte-level BPE (GPT-2 / Llama-3)    -> model "gpt2" + merges + a pre-tokenizer name
Special token ids, add_bos/add_eos and the chat template come from gguf's SpecialVocab.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf

from ..errors import InvalidModel

TokenType = gguf.TokenType

# llama.cpp identifies a byte-level BPE pre-tokenizer by hashing the HF tokenizer's ids for this
# text (convert_hf_to_gguf.get_vocab_base_pre); a few known hashes for Llama-family tokenizers.
PRE_PROBE = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'  # noqa: E501
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM/SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}
# Llama 3's split regex; a tokenizer.json that uses it gets llama.cpp's "llama-bpe" pre-tokenizer.
_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"


def _looks_special(text: str) -> bool:
    """Added tokens some models forget to flag as special (llama.cpp's does_token_look_special)."""
    return (text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _tokenizer_config(root: Path) -> dict:
    path = root / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def sentencepiece_vocab(root: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types from tokenizer.model, overlaid with added tokens like llama.cpp."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(root / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores, types = [-10000.0] * n_vocab, [TokenType.UNUSED] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i], scores[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i)
        types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                    else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                    else TokenType.NORMAL)
    _overlay_added_tokens(root, tokens, scores, types)
    return tokens, scores, types


def _overlay_added_tokens(root: Path, tokens: list[bytes], scores: list[float], types: list[int]) -> None:
    """Tokens added on top of the SentencePiece model (added_tokens.json, added_tokens_decoder)."""
    added = root / "added_tokens.json"
    if added.is_file():
        for text, i in json.loads(added.read_text(encoding="utf-8")).items():
            if i < len(tokens):
                tokens[i], scores[i], types[i] = text.encode(), -1000.0, TokenType.USER_DEFINED
    for key, info in _tokenizer_config(root).get("added_tokens_decoder", {}).items():
        i, text = int(key), info["content"]
        if i >= len(tokens):
            continue
        if info.get("special") or _looks_special(text):
            types[i] = TokenType.CONTROL
        else:  # llama.cpp expects user-defined tokens pre-normalized: "▁" back to a space
            text, types[i] = text.replace("\u2581", " "), TokenType.USER_DEFINED
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0


def _is_spm_style_json(tok_json: dict) -> bool:
    model = tok_json.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _pre_tokenizer_name(root: Path, tokenizer, tok_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer: by probe hash, else by its regex."""
    ids = tokenizer.encode(PRE_PROBE)
    digest = sha256(str(ids).encode()).hexdigest()
    if digest in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[digest]
    if _LLAMA3_REGEX_START in json.dumps(tok_json.get("pre_tokenizer"), ensure_ascii=False):
        return "llama-bpe"
    return "gpt-2"  # plain ByteLevel pre-tokenizer; the tokenization check catches a wrong guess


def bpe_vocab(root: Path, n_vocab: int) -> tuple[list[str], list[int], str]:
    """Tokens, types and pre-tokenizer name for a byte-level BPE tokenizer.json."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root)
    tok_json = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            text = by_id[i]
            special = added[i].special or _looks_special(text)
            tokens.append(text)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types, _pre_tokenizer_name(root, tokenizer, tok_json)


def write_vocab(w: gguf.GGUFWriter, root: Path, n_vocab: int) -> str:
    """Write tokenizer.ggml.* for the tokenizer in `root`; return the GGUF tokenizer model name."""
    if (add_prefix := _tokenizer_config(root).get("add_prefix_space")) is not None:
        w.add_add_space_prefix(add_prefix)
    if (root / "tokenizer.model").is_file():
        tokens, scores, types = sentencepiece_vocab(root, n_vocab)
        return _write_llama_vocab(w, root, tokens, scores, types)
    if not (root / "tokenizer.json").is_file():
        raise InvalidModel(f"{root} has no tokenizer.model or tokenizer.json")
    tok_json = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
    if _is_spm_style_json(tok_json):
        vocab = gguf.LlamaHfVocab(root)
        tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
        return _write_llama_vocab(w, root, tokens, scores, types)
    if tok_json.get("model", {}).get("type") != "BPE":
        raise InvalidModel(f"tokenizer model {tok_json.get('model', {}).get('type')!r} is not supported "
                           "(supported: SentencePiece tokenizer.model, BPE tokenizer.json)")
    tokens, types, pre = bpe_vocab(root, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(root, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)
    return "gpt2"


def _write_llama_vocab(w, root: Path, tokens, scores, types) -> str:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(root, n_vocab=len(tokens)).add_to_gguf(w)
    return "llama"


__all__ = ["write_vocab", "sentencepiece_vocab", "bpe_vocab", "PRE_PROBE", "KNOWN_PRE_HASHES"]
