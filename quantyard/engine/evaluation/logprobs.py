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


def tail_sample(logp: np.ndarray, top_ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n ids per row drawn from the distribution outside `top_ids` (p_i / p_rest), by systematic
    sampling: one uniform offset per row, points (j + u) / n on the tail's CDF. Unbiased for any
    mean over the tail, with far less variance than independent draws."""
    p = np.exp(logp)
    np.put_along_axis(p, top_ids, 0.0, axis=-1)
    cdf = np.cumsum(p, axis=-1)
    cdf /= cdf[:, -1:]
    points = (np.arange(n)[None, :] + rng.random((logp.shape[0], 1))) / n
    out = np.empty((logp.shape[0], n), np.int64)
    for r in range(logp.shape[0]):
        out[r] = np.minimum(np.searchsorted(cdf[r], points[r], side="right"), logp.shape[1] - 1)
    # a float rounding at the CDF's flat ends could land on a top id (probability 0): step off it
    bad = p[np.arange(logp.shape[0])[:, None], out] <= 0
    if bad.any():
        out[bad] = np.broadcast_to(p.argmax(-1)[:, None], out.shape)[bad]
    return out


def summarise(logits: np.ndarray, targets: np.ndarray, top_k: int, tail_n: int, seed: int
              ) -> tuple[np.ndarray, ...]:
    """What a reference keeps of logits [m, n_vocab] whose rows predict `targets` [m]: top-k ids
    (int32) and their log-probs, the rest's log-mass, the target's log-prob and `tail_n` ids
    sampled from the rest with their log-probs (float32). `seed` makes the sample reproducible."""
    m = logits.shape[0]
    rng = np.random.default_rng(seed)
    ids, top = np.empty((m, top_k), np.int32), np.empty((m, top_k), np.float32)
    tail_ids, tail = np.empty((m, tail_n), np.int32), np.empty((m, tail_n), np.float32)
    rest, nxt = np.empty(m, np.float32), np.empty(m, np.float32)
    for a in range(0, m, ROWS_PER_BLOCK):
        b = min(m, a + ROWS_PER_BLOCK)
        lp = log_softmax(logits[a:b])
        k_ids = top_k_ids(lp, top_k)
        ids[a:b], top[a:b] = k_ids, np.take_along_axis(lp, k_ids, axis=-1)
        rest[a:b] = rest_logp(lp, k_ids)
        nxt[a:b] = lp[np.arange(b - a), targets[a:b]]
        t_ids = tail_sample(lp, k_ids, tail_n, rng)
        tail_ids[a:b], tail[a:b] = t_ids, np.take_along_axis(lp, t_ids, axis=-1)
    return ids, top, rest, nxt, tail_ids, tail


__all__ = ["ROWS_PER_BLOCK", "log_softmax", "logsumexp", "top_k_ids", "rest_logp", "tail_sample", "summarise"]
