"""Chunking exactly like llama.cpp's `llama-perplexity` (tools/perplexity/perplexity.cpp).

The whole text is tokenized once (with BOS when the vocabulary adds one), cut into
n_chunk = n_tokens // n_ctx chunks of n_ctx tokens (the tail is dropped), and each chunk's first
token is replaced by BOS when the vocabulary adds BOS. Each chunk is evaluated on its own (fresh
KV cache); only the second half is scored, so every scored token has at least n_ctx/2 tokens of
context: the logits at positions first = n_ctx//2 .. n_ctx-2 predict tokens first+1 .. n_ctx-1,
n_ctx - 1 - first positions per chunk. llama-perplexity refuses texts under 2*n_ctx tokens.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidModel

MIN_N_CTX = 16
MAX_N_CTX = 32768


def first_scored(n_ctx: int) -> int:
    """The first position whose logits are scored."""
    return n_ctx // 2


def scored_per_chunk(n_ctx: int) -> int:
    return n_ctx - 1 - first_scored(n_ctx)


def make_chunks(ids: list[int], *, n_ctx: int, bos: int | None, max_chunks: int | None = None) -> np.ndarray:
    """int32 [n_chunks, n_ctx]: the chunks as evaluated (BOS first when `bos` is given)."""
    if not MIN_N_CTX <= n_ctx <= MAX_N_CTX:
        raise InvalidModel(f"n_ctx={n_ctx} is outside {MIN_N_CTX}..{MAX_N_CTX}")
    if len(ids) < 2 * n_ctx:  # llama-perplexity's own limit
        raise InvalidModel(f"the evaluation text is {len(ids)} tokens: at least {2 * n_ctx} (2 x n_ctx) are needed "
                           f"to evaluate with a context of {n_ctx}", details={"n_tokens": len(ids), "n_ctx": n_ctx})
    n_chunks = len(ids) // n_ctx
    if max_chunks is not None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be at least 1, not {max_chunks}")
        n_chunks = min(n_chunks, max_chunks)
    chunks = np.asarray(ids[: n_chunks * n_ctx], dtype=np.int64).reshape(n_chunks, n_ctx)
    if bos is not None:
        chunks[:, 0] = bos
    return chunks.astype(np.int32)


def scored_targets(chunk: np.ndarray) -> np.ndarray:
    """The next tokens the scored positions of one chunk predict."""
    n_ctx = chunk.shape[0]
    return np.asarray(chunk[first_scored(n_ctx) + 1:], dtype=np.int64)


__all__ = ["MIN_N_CTX", "MAX_N_CTX", "first_scored", "scored_per_chunk", "make_chunks", "scored_targets"]
