"""The source's outputs on the evaluation text, stored once per source: llama.cpp's KL base file
(`llama-perplexity --kl-divergence-base`), made small.

llama.cpp stores every scored position's whole distribution (uint16 log-probs over the full
vocabulary: ~26 GB for 100k positions of a 128k vocabulary). We keep, per scored position, the
source's top-k log-probs with their ids, the log of the mass outside them, the log-prob of the
actual next token, and TAIL_N token ids drawn from the rest (systematic sampling on its CDF) with
their log-probs. A report's KL is exact over the top-k and an unbiased estimate over the rest
(p_rest x the mean of log p - log q over the drawn ids). Top-k alone is not enough: the
(k+1)-bin KL is a lower bound that converges slowly, the tail holds a fifth of the KL at k = 64.

File: safetensors (no pickle), tensors tokens I32 [n_chunks, n_ctx], top_ids I32 [n_scored, k],
top_logp F32 [n_scored, k], rest_logp F32 [n_scored], next_logp F32 [n_scored], tail_ids I32 and
tail_logp F32 [n_scored, TAIL_N]; metadata format,
n_vocab, text_sha256. It travels through object storage, so `load` treats it as hostile: the
strict header parser, every count capped, shapes consistent with each other, ids inside the
vocabulary, values finite, each row a probability distribution.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidModel
from ..hf.safetensors_header import read_safetensors_header
from ..hf.sanity import SIZE_FIELDS
from .chunks import MAX_N_CTX, MIN_N_CTX, first_scored, make_chunks, scored_per_chunk, scored_targets
from .logprobs import summarise
from .text import check_evaluation_text, default_evaluation_text, text_sha256

FORMAT = "quantyard.eval-reference/1"
# Mean KL against the full-vocabulary KL, SmolLM2-135M, F16 GGUF as the base, 4 chunks x 128 of
# the default text (252 positions; llama.cpp's logits both sides):
#   (k+1)-bin KL only:  k=64 Q8_0 -18.7%, Q4_K_M -20.3%;  k=256 -8.5%, -9.7%  (too biased)
#   top-64 + 64 tail draws (what we store): Q8_0 +0.37%, Q4_K_M +0.41%; top-32: -0.18%, +1.95%
#   (plain tail mean, one-off script). report.py scores the tail with a control variate since:
#   per-position error 3-11% instead of 50-800% (tests/engine/test_evaluation_tail.py), and the
#   full-vocabulary oracle of tests/engine/test_onnx_eval.py agrees within 0.2%.
# 1 KB per scored position: ~14 MB for the default text at n_ctx 512.
TOP_K = 64
TAIL_N = 64
DEFAULT_N_CTX = 512
MAX_TOP_K = 1024
MAX_VOCAB = SIZE_FIELDS["vocab_size"][1]
MAX_CHUNK_TOKENS = 1 << 20  # n_chunks * n_ctx: the 1 MiB text cap is ~250k tokens
MAX_FILE_BYTES = 1 << 30
_TENSORS = {"tokens": ("I32", 2), "top_ids": ("I32", 2), "top_logp": ("F32", 2), "rest_logp": ("F32", 1),
            "next_logp": ("F32", 1), "tail_ids": ("I32", 2), "tail_logp": ("F32", 2)}

Progress = Callable[[float, str], None]


@dataclass(frozen=True, eq=False)
class EvalReference:
    """A source's reference outputs on an evaluation text (module docstring). Arrays read-only."""

    n_ctx: int
    tokens: np.ndarray
    top_ids: np.ndarray
    top_logp: np.ndarray
    rest_logp: np.ndarray
    next_logp: np.ndarray
    n_vocab: int
    text_sha256: str
    tail_ids: np.ndarray
    tail_logp: np.ndarray

    def __post_init__(self) -> None:
        for name, dtype in (("tokens", np.int32), ("top_ids", np.int32), ("top_logp", np.float32),
                            ("rest_logp", np.float32), ("next_logp", np.float32), ("tail_ids", np.int32),
                            ("tail_logp", np.float32)):
            a = np.array(getattr(self, name), dtype=dtype, copy=True)
            a.flags.writeable = False
            object.__setattr__(self, name, a)
        n_chunks, n_ctx = self.tokens.shape if self.tokens.ndim == 2 else (0, -1)
        n = n_chunks * scored_per_chunk(self.n_ctx)
        if n_ctx != self.n_ctx or self.top_ids.shape != self.top_logp.shape or self.top_ids.ndim != 2 \
                or self.top_ids.shape[0] != n or self.rest_logp.shape != (n,) or self.next_logp.shape != (n,) \
                or self.tail_ids.shape != self.tail_logp.shape or self.tail_ids.ndim != 2 or self.tail_ids.shape[0] != n:
            raise ValueError(f"inconsistent reference shapes: tokens {self.tokens.shape}, top {self.top_ids.shape}/"
                             f"{self.top_logp.shape}, rest {self.rest_logp.shape}, next {self.next_logp.shape} "
                             f"for n_ctx {self.n_ctx}")

    @property
    def n_chunks(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_scored(self) -> int:
        return int(self.next_logp.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.top_ids.shape[1])

    @property
    def source_ppl(self) -> float:
        return math.exp(-float(np.mean(self.next_logp, dtype=np.float64)))

    def rows(self, chunk: int) -> slice:
        """The scored rows of one chunk."""
        per = scored_per_chunk(self.n_ctx)
        return slice(chunk * per, (chunk + 1) * per)

    def save(self, path: Path) -> None:
        """Write atomically (a reader never sees half a file)."""
        from safetensors.numpy import save_file

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({name: np.ascontiguousarray(getattr(self, name)) for name in _TENSORS}, str(tmp),
                  metadata={"format": FORMAT, "n_vocab": str(self.n_vocab), "text_sha256": self.text_sha256})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> EvalReference:
        """Read a file written by `save`; InvalidModel saying what is wrong with any other."""
        return _load(Path(path))


def _bad(path: Path, what: str) -> InvalidModel:
    return InvalidModel(f"evaluation reference {path.name}: {what}", details={"file": path.name})


def _read(ref, dtype: str) -> np.ndarray:
    raw = np.memmap(ref.file, dtype=dtype, mode="r", offset=ref.offset, shape=tuple(ref.shape))
    try:
        return np.array(raw)
    finally:
        del raw


def _check_header(path: Path, refs: dict, meta: dict) -> tuple[int, int, int, str]:
    """Everything that can be checked before a byte of data is read: n_ctx, k, n_vocab, digest."""
    if meta.get("format") != FORMAT:
        raise _bad(path, f"format is {str(meta.get('format'))[:40]!r}, not {FORMAT!r}")
    if set(refs) != set(_TENSORS):
        raise _bad(path, f"holds tensors {sorted(refs)[:6]}, expected {sorted(_TENSORS)}")
    for name, (dtype, ndim) in _TENSORS.items():
        if refs[name].dtype != dtype or len(refs[name].shape) != ndim:
            raise _bad(path, f"{name} is {refs[name].dtype}{list(refs[name].shape)}, expected a {ndim}-d {dtype} tensor")
    digest = meta.get("text_sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _bad(path, "text_sha256 is not a sha256 hex digest")
    n_vocab_text = meta.get("n_vocab", "")
    if not (isinstance(n_vocab_text, str) and n_vocab_text.isdigit() and len(n_vocab_text) <= 9):
        raise _bad(path, "n_vocab is not a number")
    n_vocab = int(n_vocab_text)
    n_chunks, n_ctx = refs["tokens"].shape
    n, k = refs["top_ids"].shape
    if not MIN_N_CTX <= n_ctx <= MAX_N_CTX or not 0 < n_chunks * n_ctx <= MAX_CHUNK_TOKENS:
        raise _bad(path, f"tokens of shape [{n_chunks}, {n_ctx}] are out of bounds (n_ctx {MIN_N_CTX}..{MAX_N_CTX}, "
                   f"at most {MAX_CHUNK_TOKENS} tokens)")
    if not 1 < n_vocab <= MAX_VOCAB or not 0 < k <= min(MAX_TOP_K, n_vocab - 1):
        raise _bad(path, f"n_vocab {n_vocab} / top-k {k} out of bounds (vocabulary at most {MAX_VOCAB}, k at most "
                   f"{MAX_TOP_K} and below the vocabulary)")
    want = n_chunks * scored_per_chunk(n_ctx)
    shapes = {name: tuple(refs[name].shape) for name in ("top_logp", "rest_logp", "next_logp", "tail_logp")}
    n_tail = refs["tail_ids"].shape[1]
    if n != want or refs["tail_ids"].shape != (n, n_tail) or not 0 < n_tail <= MAX_TOP_K \
            or shapes != {"top_logp": (n, k), "rest_logp": (n,), "next_logp": (n,), "tail_logp": (n, n_tail)}:
        raise _bad(path, f"{n} scored rows ({shapes}) where {n_chunks} chunks of {n_ctx} score {want}")
    if sum(r.nbytes for r in refs.values()) > MAX_FILE_BYTES:
        raise _bad(path, f"larger than {MAX_FILE_BYTES >> 20} MiB")
    return n_ctx, k, n_vocab, digest


def _check_values(path: Path, a: dict[str, np.ndarray], n_vocab: int) -> None:
    for name in ("tokens", "top_ids", "tail_ids"):
        if a[name].min() < 0 or a[name].max() >= n_vocab:
            raise _bad(path, f"a token id in {name} is outside the vocabulary of {n_vocab}")
    for name in ("top_logp", "rest_logp", "next_logp", "tail_logp"):
        if not np.isfinite(a[name]).all() or a[name].max() > 1e-3:
            raise _bad(path, f"{name} holds NaN, infinity or a positive log-probability")
    if (np.diff(a["top_logp"], axis=1) > 0).any():
        raise _bad(path, "top_logp rows are not in descending order")
    ids = np.sort(a["top_ids"], axis=1)
    if (ids[:, 1:] == ids[:, :-1]).any():
        raise _bad(path, "a top_ids row repeats a token")
    both = np.concatenate([a["top_logp"], a["rest_logp"][:, None]], axis=1).astype(np.float64)
    total = np.log(np.exp(both).sum(axis=1))
    if np.abs(total).max() > 1e-3:
        raise _bad(path, "a row's probabilities do not sum to 1 (top-k plus the rest)")
    if (a["tail_logp"] > a["rest_logp"][:, None] + 1e-4).any() or any(
            (a["tail_ids"][i:i + 256, :, None] == a["top_ids"][i:i + 256, None, :]).any()
            for i in range(0, len(a["tail_ids"]), 256)):
        raise _bad(path, "a tail token is one of its row's top-k or more probable than the whole rest")


def _load(path: Path) -> EvalReference:
    refs, meta = read_safetensors_header(path)  # InvalidModel on any malformed header
    n_ctx, _k, n_vocab, digest = _check_header(path, refs, meta)
    arrays = {name: _read(refs[name], "<i4" if dtype == "I32" else "<f4") for name, (dtype, _) in _TENSORS.items()}
    _check_values(path, arrays, n_vocab)
    return EvalReference(n_ctx=n_ctx, n_vocab=n_vocab, text_sha256=digest, **arrays)


def _assemble(chunks: np.ndarray, parts: list, n_vocab: int, text: str) -> EvalReference:
    top_ids, top_logp, rest, nxt, tail_ids, tail = (np.concatenate([p[i] for p in parts]) for i in range(6))
    return EvalReference(n_ctx=int(chunks.shape[1]), tokens=chunks, top_ids=top_ids, top_logp=top_logp,
                         rest_logp=rest, next_logp=nxt, n_vocab=n_vocab, text_sha256=text_sha256(text),
                         tail_ids=tail_ids, tail_logp=tail)


def _check_top_k(top_k: int, n_vocab: int) -> None:
    if not 0 < top_k <= min(MAX_TOP_K, n_vocab - 1):
        raise ValueError(f"top_k must be 1..{min(MAX_TOP_K, n_vocab - 1)}, not {top_k}")


def compute_eval_reference(source_dir: Path, *, text: str | None = None, n_ctx: int = DEFAULT_N_CTX,
                           max_chunks: int | None = None, top_k: int = TOP_K,
                           progress: Progress | None = None) -> EvalReference:
    """The source model's reference on `text` (default: the shipped evaluation text): transformers,
    float32, eager attention, weights streamed from the upload's files (hf.streamed: one module's
    weights at a time, each proven to be the upload's), one chunk per forward, so memory is one
    chunk's activations and logits whatever the text's length."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..gguf.imatrix import _tokens  # the tokenization llama-imatrix/llama-perplexity use
    from ..hf.streamed import streamed_model
    from ..hf.tokenizer_cache import shared_tokenizer

    text = check_evaluation_text(default_evaluation_text() if text is None else text)
    with shared_tokenizer(Path(source_dir)) as tok:
        ids, bos = _tokens(tok, text)
    chunks = make_chunks(ids, n_ctx=n_ctx, bos=bos, max_chunks=max_chunks)
    first, parts = first_scored(n_ctx), []
    with streamed_model(AutoModelForCausalLM, Path(source_dir), attn_implementation="eager") as model:
        n_vocab = int(model.model.config.vocab_size)
        _check_top_k(top_k, n_vocab)
        # only the scored half through the output head where the family allows it (halves the
        # biggest activation: 512 x 262k float32 logits are 0.5 GB)
        keep = ({"logits_to_keep": n_ctx - first}
                if "logits_to_keep" in inspect.signature(model.model.forward).parameters else {})
        for c, chunk in enumerate(chunks):
            with torch.no_grad():
                out = model.model(torch.tensor([chunk.tolist()]), use_cache=False, **keep)
            logits = out.logits[0, -(n_ctx - first):-1].float().numpy()
            del out
            parts.append(summarise(logits, scored_targets(chunk), top_k, TAIL_N, seed=c))
            if progress is not None:
                progress((c + 1) / len(chunks), f"evaluation reference: chunk {c + 1}/{len(chunks)}")
    return _assemble(chunks, parts, n_vocab, text)


def gguf_eval_reference(gguf_path: Path, *, text: str | None = None, n_ctx: int = DEFAULT_N_CTX,
                        max_chunks: int | None = None, top_k: int = TOP_K, threads: int | None = None,
                        progress: Progress | None = None) -> EvalReference:
    """The same from a GGUF run by llama.cpp (tokenized by llama.cpp), like
    `llama-perplexity --kl-divergence-base` on that file: the base when the F16/F32 artifact is
    the reference (the oracle test compares with llama.cpp's own KL on exactly this)."""
    from .runtime import chunk_logits, eval_llama, llama_tokens

    text = check_evaluation_text(default_evaluation_text() if text is None else text)
    with eval_llama(Path(gguf_path), n_ctx=n_ctx, threads=threads) as llm:
        ids, bos = llama_tokens(llm, text)
        chunks = make_chunks(ids, n_ctx=n_ctx, bos=bos, max_chunks=max_chunks)
        n_vocab = int(llm.n_vocab())
        _check_top_k(top_k, n_vocab)
        parts = [summarise(logits[:-1], scored_targets(chunk), top_k, TAIL_N, seed=c)
                 for c, (chunk, logits) in enumerate(zip(chunks, chunk_logits(llm, chunks, progress), strict=True))]
    return _assemble(chunks, parts, n_vocab, text)


__all__ = ["FORMAT", "TOP_K", "TAIL_N", "DEFAULT_N_CTX", "MAX_TOP_K", "EvalReference", "compute_eval_reference",
           "gguf_eval_reference"]
