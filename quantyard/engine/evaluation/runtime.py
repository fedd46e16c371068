"""Running a GGUF over evaluation chunks with llama.cpp (llama-cpp-python), one chunk at a time.

Like llama-perplexity: a fresh KV cache per chunk, the chunk as one sequence from position 0.
Unlike its defaults, the KV cache is F32 and flash attention off (as validation runs llama.cpp):
the report measures the artifact, not the runtime's cache rounding. Memory is one chunk's logits
(n_ctx x n_vocab float32) besides the model, however long the text."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import ValidationFailed
from .chunks import first_scored

Progress = Callable[[float, str], None]


@contextlib.contextmanager
def eval_llama(path: Path, *, n_ctx: int, threads: int | None = None, vocab_only: bool = False):
    """A llama.cpp model with logits for every position of an n_ctx chunk; always freed."""
    import llama_cpp

    from ..gguf.llama_runtime import open_llama

    kwargs: dict = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    try:
        llm = open_llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                         type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
                         vocab_only=vocab_only, verbose=False, **kwargs)
    except Exception as e:  # llama_cpp's text names the server path: not shown to tenants
        raise ValidationFailed(f"llama.cpp cannot load {Path(path).name} for evaluation",
                               details={"error": type(e).__name__}) from e
    try:
        yield llm
    finally:
        llm.close()


def llama_tokens(llm, text: str) -> tuple[list[int], int | None]:
    """The text's ids as llama-perplexity tokenizes it (common_tokenize with add_special, no
    special-token parsing) and the BOS id when the vocabulary adds BOS."""
    ids = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    return ids, (int(llm.token_bos()) if llm._model.add_bos_token() else None)


def chunk_logits(llm, chunks: np.ndarray, progress: Progress | None = None) -> Iterator[np.ndarray]:
    """float32 logits [n_ctx - first, n_vocab] of positions first..n_ctx-1 of each chunk (a copy:
    llama_cpp reuses its buffer)."""
    n_chunks, n_ctx = chunks.shape
    first = first_scored(n_ctx)
    for c in range(n_chunks):
        llm.reset()  # a fresh KV cache per chunk, as llama-perplexity clears its memory
        llm.eval([int(t) for t in chunks[c]])
        yield np.array(llm.scores[first:n_ctx], dtype=np.float32)
        if progress is not None:
            progress((c + 1) / n_chunks, f"evaluation chunk {c + 1}/{n_chunks}")


__all__ = ["eval_llama", "llama_tokens", "chunk_logits"]
