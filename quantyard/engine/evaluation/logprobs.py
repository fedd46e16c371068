"""Per-position log-probability arithmetic shared by the reference and the scorer (numpy only).

Rows are processed in blocks in float64 so that a 262k vocabulary costs ~2 MB per row, not the
whole chunk's worth at once."""

from __future__ import annotations

import numpy as np

ROWS_PER_BLOCK = 32


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of each row."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis=axis) + np.log(np.exp(x - m).sum(axis=axis))


def top_k_ids(logp: np.ndarray, k: int) -> np.ndarray:
    """The k most probable ids of each row, most probable first; among equal values the lower
    id first (llama.cpp's argmax keeps the first maximum)."""
    part = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, part, axis=-1)
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def rest_logp(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log of the probability mass outside `ids` in each row (exact: the complement's own
    log-sum-exp, not log(1 - sum), which cancels when the top-k hold nearly all the mass)."""
    rest = logp.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=-1)
    return logsumexp(rest, axis=-1)


def summarise(logits: np.ndarray, targets: np.ndarray, top_k: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What a reference keeps of logits [m, n_vocab] whose rows predict `targets` [m]: top-k ids
    (int32) and their log-probs, the rest's log-mass and the target's log-prob (float32)."""
    m = logits.shape[0]
    ids = np.empty((m, top_k), np.int32)
    top = np.empty((m, top_k), np.float32)
    rest = np.empty(m, np.float32)
    nxt = np.empty(m, np.float32)
    for a in range(0, m, ROWS_PER_BLOCK):
        b = min(m, a + ROWS_PER_BLOCK)
        lp = log_softmax(logits[a:b])
        k_ids = top_k_ids(lp, top_k)
        ids[a:b] = k_ids
        top[a:b] = np.take_along_axis(lp, k_ids, axis=-1)
        rest[a:b] = rest_logp(lp, k_ids)
        nxt[a:b] = lp[np.arange(b - a), targets[a:b]]
    return ids, top, rest, nxt


__all__ = ["ROWS_PER_BLOCK", "log_softmax", "logsumexp", "top_k_ids", "rest_logp", "summarise"]
