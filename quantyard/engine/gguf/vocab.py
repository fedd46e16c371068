"""Tokenizer -> tokenizer.ggml.* metadata, as llama.cpp's convert_hf_to_gguf.py writes it for each
supported family (conversion/base.py `_set_vocab_*`, gemma.py, phi.py, qwen.py). Our code, their facts.

Kinds of source:
- tokenizer.model (SentencePiece)                    -> model "llama", pre "default", scores + types
- tokenizer.json BPE with byte_fallback (SPM-style)  -> model "llama" via gguf's LlamaHfVocab
- tokenizer.json byte-level BPE (GPT-2/Llama-3/Qwen) -> model "gpt2" + merges + a pre-tokenizer name

Token types: SentencePiece's own (normal, unknown, control, unused, byte); added tokens become
CONTROL when flagged special or when they look special (<|...|>, <pad>, <unusedN>, ...), else
USER_DEFINED with "▁" pre-normalised to a space (Phi-3 uses only the special flag). Special token
ids, add_bos/add_eos and the chat template come from gguf-py's SpecialVocab (the code
convert_hf_to_gguf itself runs). The gguf-py inside llama.cpp's own tree is newer than gguf 0.19 on
PyPI; special_vocab() adds what it reads beyond PyPI's (post-processor add_bos/add_eos, which win
over tokenizer_config.json's add_*_token; a TemplateProcessing's leading token as BOS when
tokenizer_config.json names none; the normalizer's lowercase/strip_accents flags), and
LlamaModel.set_vocab's rule that a 49152-token vocabulary (SmolLM, Granite) adds no BOS.
tests/engine/test_metadata_parity.py compares every key with convert_hf_to_gguf.py's output.

`tokenizer.ggml.pre` for byte-level BPE: llama.cpp keys it off a hash of the tokenizer's ids on a
probe text (pre_hashes.py). A tokenizer no table knows (a new model, our tiny test tokenizers) is
recognised from its pre_tokenizer structure instead (split regex, digit splitting, plain
ByteLevel), then from the model family; validation's tokenization check catches a wrong guess.

One deliberate difference: a folder written by transformers >= 5 has no `added_tokens_decoder` in
tokenizer_config.json (its added tokens live only in tokenizer.json); we then read the same list
from tokenizer.json, which is what transformers 4 would have written, instead of losing the
added tokens' types.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf

from ..errors import InvalidModel
from ..hf.tokenizer_cache import shared_tokenizer, tokenizer_files_stamp
from ..jsonsafe import load_json_object
from .pre_hashes import PRE_TOKENIZER_HASHES

TokenType = gguf.TokenType

PRE_PROBE = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'  # noqa: E501
KNOWN_PRE_HASHES = PRE_TOKENIZER_HASHES

# Split regexes of the pre-tokenizers we recognise structurally (as HF tokenizer.json spells them).
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_REGEX_NAMES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
# Last resort per family when neither hash nor structure says more.
_FAMILY_DEFAULT_PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "gemma3": "default", "gpt2": "gpt-2", "phi3": "gpt-2"}


@dataclass(frozen=True)
class VocabInfo:
    """What write_vocab wrote (for results and tests)."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    n_tokens: int
    pre_source: str  # "fixed", "hash", "structure" or "family"


def does_token_look_special(text: str | bytes) -> bool:
    """Added tokens some models forget to flag special (convert_hf_to_gguf's heuristic)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


# tokenizer.json of a 262k vocabulary with its merges is ~35 MB; parsed, a file costs ~10x its size.
MAX_TOKENIZER_JSON_BYTES = 96 * 1024 * 1024


# Parsed tokenizer files of the source being converted, keyed by path and file identity: one job
# asks for tokenizer.json ~6 times (architecture, vocabulary, special vocabulary, estimates), each
# parse of a 150k+ vocabulary ~1 s. A few entries: one source's files, never a growing set.
_PARSED: dict[tuple, dict] = {}
_PARSED_MAX = 4
_parsed_lock = threading.Lock()


def _read_json(path: Path) -> dict:
    """A tokenizer file from the upload, parsed with caps (InvalidModel naming it). Shared between
    callers while the file is unchanged: read it, never modify it."""
    try:
        st = path.stat()
    except OSError:
        return {}
    if not path.is_file():
        return {}
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    with _parsed_lock:
        if key in _PARSED:
            return _PARSED[key]
    data = load_json_object(path, name=path.name, max_bytes=MAX_TOKENIZER_JSON_BYTES,
                            reject_duplicates=False)  # a repeated vocab entry is not an attack
    with _parsed_lock:
        while len(_PARSED) >= _PARSED_MAX:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = data
    return data


def tokenizer_config(root: Path) -> dict:
    return _read_json(Path(root) / "tokenizer_config.json")


def _added_tokens_decoder(root: Path) -> dict[int, dict]:
    """tokenizer_config.json's added_tokens_decoder, or tokenizer.json's added_tokens when a
    transformers >= 5 save left the former out (same entries: content, special, normalized...)."""
    cfg = tokenizer_config(root)
    if "added_tokens_decoder" in cfg:
        return {int(k): v for k, v in cfg["added_tokens_decoder"].items()}
    return {int(t["id"]): t for t in _read_json(root / "tokenizer.json").get("added_tokens", [])}


def _ids(tok_json: dict) -> list[tuple[str, list]]:
    """(field, ids) of tokenizer.json's vocabularies: model.vocab (a {token: id} map, or
    Unigram's [[token, score], ...] list whose ids are the positions) and added_tokens."""
    model = tok_json.get("model")
    if model is not None and not isinstance(model, dict):
        raise InvalidModel("tokenizer.json: model is not an object", details={"file": "tokenizer.json",
                                                                             "field": "model"})
    vocab = (model or {}).get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab))) if isinstance(vocab, list) else []
    added = tok_json.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        raise InvalidModel("tokenizer.json: added_tokens is not a list of objects",
                           details={"file": "tokenizer.json", "field": "added_tokens"})
    return [("model.vocab", ids), ("added_tokens", [t.get("id") for t in added])]


def check_token_ids(tok_json: dict, n_vocab: int | None) -> None:
    """tokenizer.json's ids are integers below config.json's vocab_size, checked on the parsed
    JSON: a 250k-token file against a 512-row embedding is refused in milliseconds instead of
    after transformers spent seconds (and hundreds of MB) building the tokenizer."""
    for field, ids in _ids(tok_json):
        if not all(type(i) is int and i >= 0 for i in ids):  # bool is no id either
            raise InvalidModel(f"tokenizer.json: {field} has a token id that is not a non-negative integer",
                               details={"file": "tokenizer.json", "field": field})
        if n_vocab and ids and max(ids) >= n_vocab:
            raise InvalidModel(f"tokenizer.json: {field} has token id {max(ids)} ({len(ids)} tokens), past "
                               f"config.json's vocab_size {n_vocab}",
                               details={"file": "tokenizer.json", "field": field, "token_id": max(ids),
                                        "vocab_size": n_vocab})


# ---- SentencePiece ---------------------------------------------------------------------------

def _sentencepiece_base(root: Path, n_vocab: int | None):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(root / "tokenizer.model"))
    except (RuntimeError, OSError):  # its text names the server path: not passed on
        raise InvalidModel("tokenizer.model is not a readable SentencePiece model",
                           details={"file": "tokenizer.model"}) from None
    n_vocab = n_vocab or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores, types = [-10000.0] * n_vocab, [int(TokenType.UNUSED)] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i], scores[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i)
        types[i] = int(TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                       else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                       else TokenType.NORMAL)
    for text, i in _read_json(root / "added_tokens.json").items():
        if i < n_vocab:
            tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, int(TokenType.USER_DEFINED)
    return tokens, scores, types


def sentencepiece_vocab(root: Path, n_vocab: int | None) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types from tokenizer.model overlaid with added tokens (TextModel's
    _create_vocab_sentencepiece: Llama, Mistral, Gemma, Qwen2 with a .model)."""
    root = Path(root)
    tokens, scores, types = _sentencepiece_base(root, n_vocab)
    for i, info in _added_tokens_decoder(root).items():
        if i >= len(tokens):
            continue
        text = info["content"]
        if info.get("special") or does_token_look_special(text):
            types[i] = int(TokenType.CONTROL)
        else:  # llama.cpp expects user-defined tokens pre-normalized: "▁" back to a space
            text, types[i] = text.replace("\u2581", " "), int(TokenType.USER_DEFINED)
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0
    return tokens, scores, types


def phi3_sentencepiece_vocab(root: Path, n_vocab: int | None) -> tuple[list[bytes], list[float], list[int]]:
    """Phi-3's variant: added tokens are USER_DEFINED unless flagged special (no look-special
    heuristic, no "▁" rewrite), from tokenizer_config.json and then tokenizer.json."""
    root = Path(root)
    tokens, scores, types = _sentencepiece_base(root, n_vocab)
    entries = [(int(k), v) for k, v in tokenizer_config(root).get("added_tokens_decoder", {}).items()]
    entries += [(int(t["id"]), t) for t in _read_json(root / "tokenizer.json").get("added_tokens", [])]
    for i, info in entries:
        if i >= len(tokens):
            raise InvalidModel(f"added token {info['content']!r} has id {i}, past the vocabulary ({len(tokens)})")
        tokens[i], scores[i] = info["content"].encode("utf-8"), -1000.0
        types[i] = int(TokenType.CONTROL if info.get("special") else TokenType.USER_DEFINED)
    return tokens, scores, types


# ---- byte-level BPE --------------------------------------------------------------------------

def _split_regexes(pre_tokenizer: dict | None) -> list[str]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [r for p in pre_tokenizer.get("pretokenizers", []) for r in _split_regexes(p)]
    if pre_tokenizer.get("type") == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return [pattern.get("Regex") or pattern.get("String") or ""]
    return []


def _parts(pre_tokenizer: dict | None) -> list[dict]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [q for p in pre_tokenizer.get("pretokenizers", []) for q in _parts(p)]
    return [pre_tokenizer]


def pre_tokenizer_from_structure(tok_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer name from tokenizer.json's pre_tokenizer, or None if unknown."""
    pre = tok_json.get("pre_tokenizer")
    regexes = _split_regexes(pre)
    if len(regexes) == 1 and regexes[0] in _REGEX_NAMES:
        return _REGEX_NAMES[regexes[0]]
    if regexes:
        return None
    kinds = [p.get("type") for p in _parts(pre)]
    byte_level = [p for p in _parts(pre) if p.get("type") == "ByteLevel"]
    if len(byte_level) == 1 and byte_level[0].get("use_regex", True):
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        digits = [p for p in _parts(pre) if p.get("type") == "Digits"]
        if kinds == ["Digits", "ByteLevel"] and digits[0].get("individual_digits"):
            return "smollm"
    return None


def pre_tokenizer_name(tokenizer, tok_json: dict, family: str) -> tuple[str, str]:
    """(name, how it was found) for a byte-level BPE tokenizer."""
    digest = sha256(str(tokenizer.encode(PRE_PROBE)).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest], "hash"
    if (name := pre_tokenizer_from_structure(tok_json)) is not None:
        return name, "structure"
    return _FAMILY_DEFAULT_PRE.get(family, "gpt-2"), "family"


def bpe_vocab(root: Path, n_vocab: int | None, family: str = "gpt2") -> tuple[list[str], list[int], str, str]:
    """Tokens, types, pre-tokenizer name and how it was found (TextModel.get_vocab_base)."""
    tok_json = _read_json(Path(root) / "tokenizer.json")
    check_token_ids(tok_json, n_vocab)  # before the (slow) build
    # the source's one tokenizer, which validation and the imatrix use too (loaded once per source)
    with shared_tokenizer(Path(root)) as tokenizer:
        return _bpe_tokens(tokenizer, tok_json, n_vocab, family)


def _bpe_tokens(tokenizer, tok_json: dict, n_vocab: int | None, family: str) -> tuple[list[str], list[int], str, str]:
    vocab = tokenizer.get_vocab()
    n_vocab = n_vocab or len(vocab)
    if max(vocab.values()) >= n_vocab:  # ids the JSON did not show (tokenizer_config.json's added tokens)
        raise InvalidModel(f"tokenizer.json: the tokenizer has token id {max(vocab.values())}, past config.json's "
                           f"vocab_size {n_vocab}", details={"file": "tokenizer.json", "field": "vocab_size"})
    pre, how = pre_tokenizer_name(tokenizer, tok_json, family)
    by_id = {i: t for t, i in vocab.items()}
    added_vocab = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        token = str(by_id[i])
        if token in added_vocab:
            if not decoder[i].normalized:  # llama.cpp assumes added tokens are pre-normalized
                token = str(tokenizer.decode(tokenizer.encode(token, add_special_tokens=False)))
            if decoder[i].special or does_token_look_special(token):
                types.append(int(TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(token)
    return tokens, types, pre, how


def _is_spm_style_json(tok_json: dict) -> bool:
    model = tok_json.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


# ---- special tokens: llama.cpp's gguf-py where it differs from PyPI's gguf 0.19 ---------------

def _template_special(entry) -> str | None:
    special = entry.get("SpecialToken") if isinstance(entry, dict) else None
    return special.get("id") if isinstance(special, dict) else None


def _post_processor_rules(tok_json: dict, cfg: dict) -> tuple[dict[str, bool], dict[str, str]]:
    """(add_* flags, {"bos"/"cls": token content}) that llama.cpp's gguf-py (SpecialVocab.
    _try_load_from_tokenizer_json) reads from tokenizer.json's post-processor: a ByteLevel
    processor adds neither BOS nor EOS unless a later processor says so; a TemplateProcessing
    whose single-sequence template starts with a token tokenizer_config.json does not name makes
    that token the BOS (and CLS) where those are unnamed. A pair template's sep flag is left to PyPI's."""
    bos, cls, eos, sep = (cfg.get(k) for k in ("bos_token", "cls_token", "eos_token", "sep_token"))
    if not bos and cls and cfg:
        bos = cls
    if not eos and sep and cfg:
        eos = sep
    flags: dict[str, bool] = {}
    named: dict[str, str] = {}
    processor = tok_json.get("post_processor")
    processors = processor.get("processors", [processor]) if isinstance(processor, dict) else []
    for p in processors if isinstance(processors, list) else []:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            flags.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing" and isinstance(single := p.get("single"), list) and len(single) > 1:
            if first := _template_special(single[0]):
                if cfg and first not in (bos, cls):
                    if not bos:
                        bos = named["bos"] = first
                    if not cls:
                        cls = named["cls"] = first
                flags["bos"] = first in (bos, cls) if cfg else True
            if _template_special(single[-1]):
                flags["eos"] = True  # the template's last token becomes the EOS if it was not
    return flags, named


def _normalizer_flags(normalizer: dict | None) -> dict[str, bool]:
    """tokenizer.ggml.normalizer.* from tokenizer.json's normalizer (gguf-py's _parse_normalizer)."""
    normalizer = normalizer if isinstance(normalizer, dict) else {}
    kind, flags = normalizer.get("type"), {}
    if kind == "Lowercase":
        flags["lowercase"] = True
    elif kind == "StripAccents":
        flags["strip_accents"] = True
    elif kind == "BertNormalizer":
        flags = {k: v for k in ("lowercase", "strip_accents") if (v := normalizer.get(k)) is not None}
    elif kind == "Sequence":
        for n in normalizer.get("normalizers") or []:
            flags.update(_normalizer_flags(n))
    return flags


# gguf-py's SpecialVocab per (folder, its tokenizer files' stamp, arguments): the estimate and
# the writer both read it (a 151k-token BPE's merges take ~1 s to load). Callers get a copy.
_SPECIAL: dict[tuple, gguf.SpecialVocab] = {}
_SPECIAL_MAX = 4


def special_vocab(root: Path, *, load_merges: bool = False, n_vocab: int | None = None) -> gguf.SpecialVocab:
    """`gguf.SpecialVocab(root, load_merges=, n_vocab=)`, read once while the folder's tokenizer
    files are unchanged; the copy returned may be changed (its dicts and merges are its own)."""
    key = (str(Path(root).resolve()), tokenizer_files_stamp(Path(root)), load_merges, n_vocab)
    with _parsed_lock:
        cached = _SPECIAL.get(key)
    if cached is None:
        cached = gguf.SpecialVocab(root, load_merges=load_merges, n_vocab=n_vocab)
        with _parsed_lock:
            while len(_SPECIAL) >= _SPECIAL_MAX:
                _SPECIAL.pop(next(iter(_SPECIAL)))
            _SPECIAL[key] = cached
    special = copy.copy(cached)
    special.merges = list(cached.merges)
    special.add_special_token = dict(cached.add_special_token)
    special.special_token_ids = dict(cached.special_token_ids)
    return special


def _add_special_vocab(w: gguf.GGUFWriter, root: Path, *, n_vocab: int | None = None, load_merges: bool = False,
                       no_bos: bool = False) -> None:
    """gguf-py's SpecialVocab written as llama.cpp's converter writes it (see the module docstring);
    `no_bos` forces add_bos_token = false."""
    special = special_vocab(root, load_merges=load_merges, n_vocab=n_vocab)
    tok_json, cfg = _read_json(root / "tokenizer.json"), tokenizer_config(root)
    if tok_json:
        flags, named = _post_processor_rules(tok_json, cfg)
        special.add_special_token.update(flags)  # the post-processor wins over tokenizer_config.json
        for typ, content in named.items():
            token_id = next((t.get("id") for t in tok_json.get("added_tokens") or [] if isinstance(t, dict)
                             and t.get("content") == content), None)
            if isinstance(token_id, int):  # else config.json's <typ>_token_id stays, as there
                special.special_token_ids.pop(typ, None)
                special._set_special_token(typ, token_id)
    if no_bos:
        special.add_special_token["bos"] = False
    special.add_to_gguf(w, quiet=True)
    for name, value in _normalizer_flags(tok_json.get("normalizer")).items():
        w.add_bool(f"tokenizer.ggml.normalizer.{name}", value)


# ---- writing ---------------------------------------------------------------------------------

def _write_spm(w: gguf.GGUFWriter, root: Path, tokens, scores, types, no_bos: bool = False) -> VocabInfo:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    _add_special_vocab(w, root, n_vocab=len(tokens), no_bos=no_bos)
    return VocabInfo("llama", "default", len(tokens), "fixed")


def _write_gpt2(w: gguf.GGUFWriter, root: Path, n_vocab: int | None, family: str, no_bos: bool = False) -> VocabInfo:
    tok_json = _read_json(root / "tokenizer.json")
    if tok_json.get("model", {}).get("type") != "BPE":
        raise InvalidModel(f"tokenizer model {tok_json.get('model', {}).get('type')!r} is not supported "
                           "(supported: SentencePiece tokenizer.model, BPE tokenizer.json)")
    tokens, types, pre, how = bpe_vocab(root, n_vocab, family)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    _add_special_vocab(w, root, load_merges=True, no_bos=no_bos)
    return VocabInfo("gpt2", pre, len(tokens), how)


def _write_llama_family(w: gguf.GGUFWriter, root: Path, n_vocab: int | None) -> VocabInfo:
    """LlamaModel.set_vocab: SentencePiece, else SPM-style tokenizer.json, else byte-level BPE."""
    if (add_prefix := tokenizer_config(root).get("add_prefix_space")) is not None:
        w.add_add_space_prefix(add_prefix)
    # "Apply to granite small models only": its vocab_size test (config.json's, 32000 if absent)
    # catches SmolLM/SmolLM2 too, which llama.cpp then marks as adding no BOS.
    no_bos = (32000 if n_vocab is None else n_vocab) == 49152
    if (root / "tokenizer.model").is_file():
        return _write_spm(w, root, *sentencepiece_vocab(root, n_vocab), no_bos)
    if _is_spm_style_json(_read_json(root / "tokenizer.json")):
        vocab = gguf.LlamaHfVocab(root)
        tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens(), strict=False))
        return _write_spm(w, root, tokens, scores, types, no_bos)
    return _write_gpt2(w, root, n_vocab, "llama", no_bos)


def write_vocab(w: gguf.GGUFWriter, root: Path, n_vocab: int | None, style: str = "llama") -> VocabInfo:
    """Write tokenizer.ggml.* for the tokenizer in `root` the way convert_hf_to_gguf does for
    the architecture family `style` (an Architecture's vocab_style)."""
    root = Path(root)
    has_spm, has_json = (root / "tokenizer.model").is_file(), (root / "tokenizer.json").is_file()
    if not (has_spm or has_json):
        raise InvalidModel("the source has no tokenizer.model or tokenizer.json")
    if style == "llama":
        return _write_llama_family(w, root, n_vocab)
    if style in ("gemma", "gemma3") and (has_spm or style == "gemma"):
        if not has_spm:
            raise InvalidModel("a Gemma 2 model needs its SentencePiece tokenizer.model")
        info = _write_spm(w, root, *sentencepiece_vocab(root, n_vocab))
        w.add_add_space_prefix(False)
        return info
    if style == "qwen2" and has_spm:
        return _write_spm(w, root, *sentencepiece_vocab(root, n_vocab))
    if style == "phi3" and tokenizer_config(root).get("tokenizer_class") != "GPT2Tokenizer":
        if not has_spm:
            raise InvalidModel("a Phi-3 model needs its SentencePiece tokenizer.model")
        return _write_spm(w, root, *phi3_sentencepiece_vocab(root, n_vocab))
    if not has_json:
        raise InvalidModel(f"the source has no tokenizer.json, which this {style} tokenizer needs")
    return _write_gpt2(w, root, n_vocab, style)


class _Recorder:
    """Stands in for a GGUFWriter and remembers its add_* calls, so one vocabulary build (the
    slow part of metadata on a 150k+ vocabulary) serves every file of a source."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        # only what a real writer has: gguf-py's SpecialVocab probes getattr(w, "add_<typ>_token_id", None)
        if not name.startswith("add_") or not hasattr(gguf.GGUFWriter, name):
            raise AttributeError(name)
        # lists frozen to tuples: every replay hands out the same immutable values (the writer
        # packs such an array once for all the files of a pass)
        return lambda *args, **kwargs: self.calls.append(
            (name, tuple(tuple(a) if isinstance(a, list) else a for a in args), kwargs))


@dataclass(frozen=True)
class RecordedVocab:
    """What write_vocab would write for a source, as the GGUFWriter calls it makes."""

    info: VocabInfo
    calls: tuple[tuple[str, tuple, dict], ...]

    def write(self, w: gguf.GGUFWriter, *_ignored) -> VocabInfo:
        """Make the same calls on `w`; signature-compatible with write_vocab."""
        for name, args, kwargs in self.calls:
            getattr(w, name)(*args, **kwargs)
        return self.info


def record_vocab(root: Path, n_vocab: int | None, style: str = "llama") -> RecordedVocab:
    """write_vocab once, into a recorder; `.write(w)` replays it into any number of writers."""
    rec = _Recorder()
    info = write_vocab(rec, root, n_vocab, style)  # type: ignore[arg-type]
    return RecordedVocab(info, tuple(rec.calls))


def gguf_vocab_size(root: Path, n_vocab: int | None) -> int:
    """How many tokens the GGUF vocab will hold (Gemma 3 cuts its embedding to this)."""
    root = Path(root)
    if (root / "tokenizer.model").is_file():
        if n_vocab:
            return n_vocab
        from sentencepiece import SentencePieceProcessor

        return SentencePieceProcessor(model_file=str(root / "tokenizer.model")).vocab_size()
    tok_json = _read_json(root / "tokenizer.json")
    check_token_ids(tok_json, n_vocab)  # at preflight (architecture() calls this), from the parsed JSON
    return len(tok_json.get("model", {}).get("vocab", {})) + len(tok_json.get("added_tokens", []))


__all__ = ["write_vocab", "record_vocab", "RecordedVocab",
           "sentencepiece_vocab", "phi3_sentencepiece_vocab", "bpe_vocab", "PRE_PROBE",
           "KNOWN_PRE_HASHES", "VocabInfo", "pre_tokenizer_name", "pre_tokenizer_from_structure",
           "does_token_look_special", "gguf_vocab_size", "tokenizer_config", "check_token_ids"]
