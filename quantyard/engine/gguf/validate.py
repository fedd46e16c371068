"""Check a written GGUF against its source with independent runtimes.

1. The strict header reader (gguf_layout: every count capped, every tensor inside the file
   with a known type and an aligned offset) re-opens it and finds every tensor we meant to
   write. Not gguf-py's GGUFReader: it builds a numpy view per vocabulary entry (about 2 s a
   file for SmolLM2's 49k tokens, 45 s over one job's outputs for a 262k vocabulary).
2. Its vocabulary and chat template are the source tokenizer's (transformers is the oracle):
   every ordinary token's text at its id, the template verbatim.
3. llama.cpp loads it, tokenizes a probe text and every added/special token exactly as the HF
   tokenizer does, and its logits on that text are close to the source model's own float32
   logits (reference.py: computed in bounded memory, once per source, or given as a stored
   ReferenceOutputs so no transformers model runs here at all).
Any failed check raises ValidationFailed carrying the numbers; nothing here only warns. The HF
tokenizer is loaded once per source folder (hf.tokenizer_cache) and shared by every check and
every target.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidModel, ValidationFailed
from ..hf.tokenizer_cache import shared_tokenizer, tokenizer_files_stamp
from .gguf_layout import Layout, array_values, read_layout
from .reference import PROBE_TEXT, ReferenceOutputs, compute_reference


@dataclass(frozen=True)
class Thresholds:
    min_top1: float
    max_mean_kl: float
    max_abs_logit_diff: float | None = None  # only meaningful where the math is unchanged (F32)


# Measured on the tiny random Llama of tests/fixtures/models.py (hidden 256, 2 layers, vocab
# 512, std 0.08), F32 source: F32 max|Δlogit| 1.1e-5; mean KL F16 2e-6, BF16 1.2e-4, Q8_0 1.5e-3
# (Q8_0 bytes identical to llama_model_quantize). Bounds below leave 5-10x margin; published
# Llama-3-8B KL for Q8_0 is 0.0014, so a healthy real model passes too.
THRESHOLDS = {
    "F32": Thresholds(min_top1=1.0, max_mean_kl=1e-5, max_abs_logit_diff=0.01),
    "F16": Thresholds(min_top1=0.9, max_mean_kl=5e-4),
    "BF16": Thresholds(min_top1=0.85, max_mean_kl=2e-3),
    "Q8_0": Thresholds(min_top1=0.8, max_mean_kl=1e-2),
}


def reopen(path: Path) -> Layout:
    """The written file's header, read back by the strict reader (raw pairs kept, so the
    vocabulary can be read from them)."""
    try:
        return read_layout(Path(path))
    except InvalidModel as e:  # any parse failure means the file is unusable
        raise ValidationFailed(f"{Path(path).name} cannot be re-opened as a GGUF: {e}") from e
    except OSError as e:  # the OS's text names the server path: not shown to tenants
        raise ValidationFailed(f"{Path(path).name} cannot be read back ({e.strerror})") from e


def check_reopens(path: Path, expected_tensors: int, layout: Layout | None = None) -> int:
    n = len((layout or reopen(path)).tensors)
    if n != expected_tensors:
        raise ValidationFailed(f"{Path(path).name} holds {n} tensors, expected {expected_tensors}",
                               details={"tensor_count": n, "expected": expected_tensors})
    return n


# Token arrays already proven against a source's tokenizer: (source folder, its files' stamp,
# sha256 of the array's raw bytes) -> token count. One conversion writes the same vocabulary into
# every target (F16, Q8_0 and the K-quants copy the intermediate's), so identical bytes are
# decoded and compared once (~0.5 s for 49k tokens, seconds for 262k).
_VOCAB_CHECKED: dict[tuple, int] = {}
_VOCAB_CHECKED_MAX = 16


def check_vocab(layout: Layout, path: Path, source_dir: Path) -> int:
    """Every token of the source tokenizer's own vocabulary (added tokens aside: the GGUF keeps
    their normalised text, and check_tokenization proves each one by its id) has the same text
    at the same id in tokenizer.ggml.tokens, which covers every id the tokenizer can produce."""
    pair = layout.kv.get("tokenizer.ggml.tokens")
    if pair is None:
        raise ValidationFailed(f"{Path(path).name} has no tokenizer.ggml.tokens")
    if not pair.raw:  # a layout read without raw bytes: nothing to key on, compare (array_values says why)
        return _compare_vocab(pair, path, source_dir)
    key = (str(Path(source_dir).resolve()), tokenizer_files_stamp(Path(source_dir)),
           hashlib.sha256(pair.raw).digest())
    if key not in _VOCAB_CHECKED:
        count = _compare_vocab(pair, path, source_dir)
        if len(_VOCAB_CHECKED) >= _VOCAB_CHECKED_MAX:
            _VOCAB_CHECKED.clear()
        _VOCAB_CHECKED[key] = count
    return _VOCAB_CHECKED[key]


def _compare_vocab(pair, path: Path, source_dir: Path) -> int:
    try:
        tokens = array_values(pair, path)
    except InvalidModel as e:
        raise ValidationFailed(f"{Path(path).name}: tokenizer.ggml.tokens cannot be read: {e}") from e
    with shared_tokenizer(source_dir) as tok:
        added = set(tok.added_tokens_decoder)
        vocab = tok.get_vocab()
    for text, i in vocab.items():
        if i in added:
            continue
        if i >= len(tokens) or tokens[i] != text:
            raise ValidationFailed("the GGUF vocabulary differs from the source tokenizer's",
                                   details={"token_id": i, "transformers": text[:100],
                                            "gguf": tokens[i][:100] if i < len(tokens) else None,
                                            "gguf_tokens": len(tokens)})
    return len(tokens)


def _as_text(pair) -> str | None:
    return pair.value if pair is not None and isinstance(pair.value, str) else None


def check_chat_template(layout: Layout, path: Path, source_dir: Path) -> bool:
    """The chat template(s) verbatim: transformers' default one as tokenizer.chat_template,
    named ones as tokenizer.chat_template.<name> (gguf-py's layout). Returns whether there is
    one. A template that was dropped or altered would change every chat, silently."""
    with shared_tokenizer(source_dir) as tok:
        want = tok.chat_template
    named = dict(want) if isinstance(want, dict) else {"default": want} if want else {}
    have = {"default": _as_text(layout.kv.get("tokenizer.chat_template"))}
    have.update({k[len("tokenizer.chat_template."):]: _as_text(v) for k, v in layout.kv.items()
                 if k.startswith("tokenizer.chat_template.")})
    have = {k: v for k, v in have.items() if v is not None}
    if have != named:
        differ = sorted(k for k in set(have) | set(named) if have.get(k) != named.get(k))
        raise ValidationFailed("the GGUF chat template differs from the source tokenizer's",
                               details={"templates": differ, "gguf": sorted(have),
                                        "transformers": sorted(named)})
    return bool(named)


_REFERENCE_CACHE: dict[tuple, ReferenceOutputs] = {}


def source_reference(source_dir: Path, text: str = PROBE_TEXT) -> ReferenceOutputs:
    """compute_reference, remembered for the last source folder (keyed by its files' sizes and
    times), so validating several targets of one source in one process runs the model once."""
    key = (str(Path(source_dir).resolve()), text, _folder_stamp(Path(source_dir)))
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE.clear()
        _REFERENCE_CACHE[key] = compute_reference(Path(source_dir), text=text)
    return _REFERENCE_CACHE[key]


def hf_reference(source_dir: Path, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids and (a writable copy of the) float32 logits of source_reference."""
    ref = source_reference(source_dir, text)
    return list(ref.token_ids), ref.logits.copy()


def _folder_stamp(folder: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                        for p in folder.iterdir() if p.is_file()))


def check_reference_tokens(reference: ReferenceOutputs, source_dir: Path) -> None:
    """A stored reference belongs to this source: its tokenizer gives the same ids for the text
    (a reference of another model, or of an edited tokenizer, would validate the wrong thing)."""
    with shared_tokenizer(source_dir) as tok:
        ids = list(tok(reference.text).input_ids)
    if ids != list(reference.token_ids):
        raise ValidationFailed("the reference outputs were not computed with this source's tokenizer",
                               details={"reference_ids": list(reference.token_ids)[:64],
                                        "transformers_ids": ids[:64]})


@contextlib.contextmanager
def llama_model(path: Path, n_ctx: int):
    """A llama.cpp model with logits for every position; always freed afterwards.

    The KV cache is kept in F32 (llama.cpp defaults to F16): we measure the artifact, not the
    runtime's cache rounding, which alone moves logits by ~0.01 on a sharp model."""
    import llama_cpp

    from .llama_runtime import open_llama

    try:
        llm = open_llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                         type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    except Exception as e:  # llama_cpp's text names the server path: not shown to tenants
        raise ValidationFailed(f"llama.cpp cannot load {path.name} (a tensor it needs is missing or has the wrong "
                               "shape, or the file is corrupt)", details={"error": type(e).__name__}) from e
    try:
        yield llm
    finally:
        llm.close()


def llama_reference(path: Path, text: str, n_ctx: int) -> tuple[list[int], np.ndarray]:
    with llama_model(path, n_ctx) as llm:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    return list(ids), logits


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _decisive(reference: np.ndarray, margin: float) -> np.ndarray:
    """Positions whose reference top-1 leads the runner-up by more than `margin`: elsewhere a
    flip of the argmax is within rounding noise and says nothing about the conversion."""
    top2 = np.partition(reference, -2, axis=-1)[:, -2:]  # [:, -1] the largest, [:, -2] the next
    return (top2[:, 1] - top2[:, 0]) > margin


# The last shared reference's log-probabilities and decisive positions: every target of a
# source is compared with the same read-only logits (ReferenceOutputs), and on a 151k vocabulary
# their float64 log-softmax is most of a comparison. Kept only for arrays nobody can change.
_reference_side_last: tuple | None = None  # (reference, margin, log-probs, decisive), swapped whole


def _reference_side(reference: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    global _reference_side_last
    hit = _reference_side_last  # one read: another thread may swap in its own
    if hit is not None and hit[0] is reference and hit[1] == margin:
        return hit[2], hit[3]
    side = _log_softmax(reference), _decisive(reference, margin)
    if not reference.flags.writeable and reference.base is None:
        _reference_side_last = (reference, margin, *side)
    return side


def compare_logits(reference: np.ndarray, candidate: np.ndarray, tie_margin: float = 0.02) -> dict[str, float]:
    """top-1 agreement (all positions and decisive ones), max |Δlogit|, mean/max per-token
    KL(reference || candidate)."""
    if reference.shape != candidate.shape:
        raise ValidationFailed(f"logit shapes differ: transformers {reference.shape}, llama.cpp {candidate.shape}")
    lp, decisive = _reference_side(reference, tie_margin)
    lq = _log_softmax(candidate)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    same = reference.argmax(-1) == candidate.argmax(-1)
    return {
        "top1_agreement": float(same.mean()),
        "top1_agreement_decisive": float(same[decisive].mean()) if decisive.any() else 1.0,
        "max_abs_logit_diff": float(np.abs(reference - candidate).max()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
    }


def added_tokens(source_dir: Path) -> list[str]:
    """Every added/special token text of the source tokenizer."""
    with shared_tokenizer(source_dir) as tok:
        return sorted({t.content for t in tok.added_tokens_decoder.values()} | set(tok.all_special_tokens))


def check_tokenization(llm, source_dir: Path, texts: list[str], *, add_special: bool = True) -> int:
    """llama.cpp's ids (special tokens parsed) must equal transformers' for every text."""
    for text in texts:
        with shared_tokenizer(source_dir) as tok:
            want = list(tok(text, add_special_tokens=add_special).input_ids)
        got = list(llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))
        if got != want:
            raise ValidationFailed("llama.cpp tokenizes differently from the source tokenizer",
                                   details={"text": text[:200], "transformers_ids": want[:64],
                                            "llama_cpp_ids": got[:64]})
    return len(texts)


def resolve_thresholds(quantization: str | None, *, max_mean_kl: float | None = None,
                       min_top1: float | None = None, max_abs_logit_diff: float | None = None,
                       thresholds: Thresholds | None = None) -> Thresholds:
    """Explicit bounds win over `thresholds`, which win over the defaults for `quantization`."""
    base = thresholds or THRESHOLDS.get(quantization or "")
    if base is None:
        if max_mean_kl is None or min_top1 is None:
            raise ValueError(f"no default thresholds for {quantization!r}: pass max_mean_kl and min_top1")
        return Thresholds(min_top1=min_top1, max_mean_kl=max_mean_kl, max_abs_logit_diff=max_abs_logit_diff)
    return Thresholds(
        min_top1=min_top1 if min_top1 is not None else base.min_top1,
        max_mean_kl=max_mean_kl if max_mean_kl is not None else base.max_mean_kl,
        max_abs_logit_diff=max_abs_logit_diff if max_abs_logit_diff is not None else base.max_abs_logit_diff,
    )


def check_metrics(metrics: dict[str, float], quantization: str, thresholds: Thresholds | None = None) -> None:
    from .quality import require_finite

    t = thresholds or THRESHOLDS[quantization]
    require_finite(metrics, f"{quantization} artifact")  # NaN compares False with every bound
    failures = []
    if metrics["top1_agreement_decisive"] < t.min_top1:
        failures.append(f"top-1 agreement {metrics['top1_agreement_decisive']:.4f} < {t.min_top1} "
                        "(positions whose reference top-1 leads by > 0.02)")
    if metrics["mean_kl"] > t.max_mean_kl:
        failures.append(f"mean KL {metrics['mean_kl']:.3g} > {t.max_mean_kl:g}")
    if t.max_abs_logit_diff is not None and metrics["max_abs_logit_diff"] > t.max_abs_logit_diff:
        failures.append(f"max |Δlogit| {metrics['max_abs_logit_diff']:.3g} > {t.max_abs_logit_diff:g}")
    if failures:
        raise ValidationFailed(f"{quantization} artifact drifts from its source: " + "; ".join(failures),
                               details=dict(metrics))


def validate_gguf(path: Path, source_dir: Path, quantization: str | None = None,
                  expected_tensors: int | None = None, *, max_mean_kl: float | None = None,
                  min_top1: float | None = None, max_abs_logit_diff: float | None = None,
                  thresholds: Thresholds | None = None, text: str = PROBE_TEXT,
                  reference: ReferenceOutputs | None = None) -> dict:
    """Run every check on the GGUF at `path` against the HF folder `source_dir`; return the
    metrics recorded with the artifact. Works for every supported architecture.

    Bounds: pass max_mean_kl / min_top1 / max_abs_logit_diff (None = not checked for the last)
    or a Thresholds; otherwise the defaults for `quantization` (F32, F16, BF16, Q8_0) apply.
    `quantization` is only a label in messages when bounds are given. `expected_tensors` None
    skips the tensor count check (the file must still parse).

    `reference`: the source's stored outputs (compute_reference); then no model is run in
    transformers here and its text is the probe (`text` is ignored). The source folder still
    provides the tokenizer the vocabulary, template and tokenization checks compare against."""
    limits = resolve_thresholds(quantization, max_mean_kl=max_mean_kl, min_top1=min_top1,
                                max_abs_logit_diff=max_abs_logit_diff, thresholds=thresholds)
    layout = reopen(path)
    tensor_count = (len(layout.tensors) if expected_tensors is None
                    else check_reopens(path, expected_tensors, layout))
    vocab_size = check_vocab(layout, path, source_dir)
    has_template = check_chat_template(layout, path, source_dir)
    del layout  # the raw header (a 262k vocabulary is ~30 MB) is not needed past this point
    if reference is None:
        reference = source_reference(source_dir, text)
    else:
        check_reference_tokens(reference, source_dir)
    text, hf_ids, hf_logits = reference.text, list(reference.token_ids), reference.logits
    specials = added_tokens(source_dir)
    with llama_model(path, n_ctx=max(64, len(hf_ids) + 8)) as llm:
        ll_ids = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
        if ll_ids != hf_ids:
            raise ValidationFailed("llama.cpp tokenizes the probe text differently from the source tokenizer",
                                   details={"transformers_ids": hf_ids, "llama_cpp_ids": ll_ids})
        # each added/special token alone must come back as its one id (right token type); text
        # around special tokens is the tokenizer tests' business (runtimes differ on spacing there)
        check_tokenization(llm, source_dir, specials, add_special=False)
        llm.eval(ll_ids)
        ll_logits = np.array(llm.scores[: len(ll_ids)], dtype=np.float32)
    metrics = compare_logits(hf_logits, ll_logits)
    check_metrics(metrics, quantization or "custom", limits)
    metrics.update({"probe_tokens": len(hf_ids), "tokenization_match": True, "special_tokens_match": True,
                    "tensor_count": tensor_count, "vocab_match": True, "vocab_size": vocab_size,
                    "chat_template_match": True, "has_chat_template": has_template})
    return metrics


__all__ = ["validate_gguf", "compare_logits", "check_metrics", "THRESHOLDS", "Thresholds", "PROBE_TEXT",
           "hf_reference", "source_reference", "check_reference_tokens", "ReferenceOutputs",
           "llama_reference", "check_reopens", "check_tokenization", "added_tokens",
           "resolve_thresholds", "llama_model", "reopen", "check_vocab", "check_chat_template"]
