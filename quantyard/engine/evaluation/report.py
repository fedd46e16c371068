"""The quality report of an artifact against its source's stored reference, computed the way
`llama-perplexity --kl-divergence` does (tools/perplexity/perplexity.cpp: kl_divergence):

- per scored position: nll = -log q(next), KL(p || q), whether argmax q equals argmax p
  ("Same top p"), Δp = q(next) - p(next);
- PPL = exp(mean nll), the source's from its stored next-token log-probs, their ratio;
- mean KL with llama.cpp's uncertainty sqrt(var / (n - 1)) (0 for n <= 10), reported as the 95%
  half-width (x 1.96); percentiles interpolated like its `percentile` (numpy's linear method);
- mean Δp and RMS Δp.

The KL is exact over the reference's top-k tokens and estimated without bias over the rest from
the reference's tail sample (reference.py), with the candidate's exact tail mass as a control
variate (`_tail_kl`).
One position's value is therefore noisy (percentiles and max slightly so); the mean is not biased.
llama.cpp sums over every token whose base log-prob is above -16, with uint16-quantized base
log-probs; tests/engine/test_evaluation_oracle.py holds the two together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ValidationFailed
from .chunks import first_scored, scored_per_chunk
from .logprobs import ROWS_PER_BLOCK, log_softmax, rest_logp
from .reference import EvalReference

Progress = Callable[[float, str], None]
Z95 = 1.959963984540054


@dataclass(frozen=True)
class QualityReport:
    """An artifact's quality on the evaluation text (module docstring). `n_tokens` counts the
    scored positions; eval_seconds_per_1k_tokens is per 1k tokens run (n_chunks x n_ctx)."""

    n_ctx: int
    n_chunks: int
    n_tokens: int
    ppl: float
    ppl_source: float
    ppl_ratio: float
    mean_kl: float
    mean_kl_ci95: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    mean_delta_p: float
    rms_delta_p: float
    max_abs_delta_p: float
    reference_top_k: int
    text_sha256: str
    eval_seconds: float | None = None
    eval_seconds_per_1k_tokens: float | None = None

    def to_dict(self) -> dict:
        """JSON-safe: plain floats, non-finite ones as None (NaN is not JSON)."""
        return {k: (float(v) if math.isfinite(v) else None) if isinstance(v, float) else v
                for k, v in asdict(self).items()}


def _mean_and_uncertainty(x: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and its standard error (0 for <= 10 values)."""
    n = x.size
    mean = float(x.mean())
    var = float((x * x).mean()) - mean * mean
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def _tail_kl(ref: EvalReference, r: slice, q: np.ndarray, top_ids: np.ndarray) -> np.ndarray:
    """Each row's KL over the tokens outside the reference's top-k, estimated from the tail sample
    with q/p as a control variate: sum_tail p log(p/q) = sum_tail p (q/p - 1 - log(q/p)) +
    p_rest - q_rest, where q_rest is exact (the candidate's whole row is here). The sampled term
    is second order in log(q/p), so its noise is far below that of the plain mean of
    log p - log q (on flat distributions it was as large as the KL itself); still unbiased."""
    p_rest = np.exp(ref.rest_logp[r].astype(np.float64))
    q_rest = np.exp(rest_logp(q, top_ids))
    log_r = np.take_along_axis(q, ref.tail_ids[r].astype(np.int64), axis=-1) - ref.tail_logp[r].astype(np.float64)
    log_r = np.minimum(log_r, 700.0)  # q/p beyond e^700 would overflow; such a row's KL is huge anyway
    return p_rest * (np.exp(log_r) - 1.0 - log_r).mean(-1) + p_rest - q_rest


def _score_rows(ref: EvalReference, rows: slice, logits: np.ndarray, targets: np.ndarray):
    """nll, KL, same-top and Δp of the scored rows of one chunk (float64, in row blocks)."""
    out = []
    for a in range(0, logits.shape[0], ROWS_PER_BLOCK):
        b = min(logits.shape[0], a + ROWS_PER_BLOCK)
        r = slice(rows.start + a, rows.start + b)
        q = log_softmax(logits[a:b])
        ids = ref.top_ids[r].astype(np.int64)
        p_top = ref.top_logp[r].astype(np.float64)
        q_top = np.take_along_axis(q, ids, axis=-1)
        kl = (np.exp(p_top) * (p_top - q_top)).sum(-1) + _tail_kl(ref, r, q, ids)
        nll = -q[np.arange(b - a), targets[a:b]]
        same = q.argmax(-1) == ids[:, 0]
        dp = np.exp(-nll) - np.exp(ref.next_logp[r].astype(np.float64))
        out.append((nll, kl, same, dp))
    return [np.concatenate([o[i] for o in out]) for i in range(4)]


def score_logits(reference: EvalReference, logits_per_chunk: Iterable[np.ndarray], *,
                 eval_seconds: float | None = None) -> QualityReport:
    """Score a candidate's logits against the reference, one chunk at a time. Each item is the
    chunk's logits, either all n_ctx positions or positions n_ctx//2 .. n_ctx-1 (what
    runtime.chunk_logits yields); the chunks come in the reference's order. The shared scorer of
    GGUF and ONNX artifacts."""
    n_ctx, per, first = reference.n_ctx, scored_per_chunk(reference.n_ctx), first_scored(reference.n_ctx)
    parts, c = [], 0
    for logits in logits_per_chunk:
        if c >= reference.n_chunks:
            raise ValueError(f"more than the reference's {reference.n_chunks} chunks of logits")
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] != reference.n_vocab or logits.shape[0] not in (n_ctx, n_ctx - first):
            raise ValidationFailed(f"chunk {c}: logits of shape {logits.shape}, expected [{n_ctx} or "
                                   f"{n_ctx - first}, {reference.n_vocab}] (the reference's vocabulary)")
        scored = logits[first:n_ctx - 1] if logits.shape[0] == n_ctx else logits[:per]
        targets = reference.tokens[c, first + 1:].astype(np.int64)
        parts.append(_score_rows(reference, reference.rows(c), scored, targets))
        c += 1
    if c != reference.n_chunks:
        raise ValueError(f"{c} chunks of logits for a reference of {reference.n_chunks}")
    nll, kl, same, dp = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return _report(reference, nll, kl, same, dp, eval_seconds)


def _report(ref: EvalReference, nll, kl, same, dp, eval_seconds: float | None) -> QualityReport:
    mean_kl, kl_unc = _mean_and_uncertainty(kl)
    log_ppl = float(nll.mean())
    log_ppl_source = -float(ref.next_logp.astype(np.float64).mean())
    n_run = ref.n_chunks * ref.n_ctx
    return QualityReport(
        n_ctx=ref.n_ctx, n_chunks=ref.n_chunks, n_tokens=int(nll.size),
        ppl=math.exp(log_ppl), ppl_source=math.exp(log_ppl_source), ppl_ratio=math.exp(log_ppl - log_ppl_source),
        mean_kl=mean_kl, mean_kl_ci95=Z95 * kl_unc,
        kl_median=float(np.median(kl)), kl_p90=float(np.percentile(kl, 90)), kl_p99=float(np.percentile(kl, 99)),
        kl_max=float(kl.max()), top1_agreement=float(same.mean()),
        mean_delta_p=float(dp.mean()), rms_delta_p=math.sqrt(float((dp * dp).mean())),
        max_abs_delta_p=float(np.abs(dp).max()), reference_top_k=ref.top_k, text_sha256=ref.text_sha256,
        eval_seconds=eval_seconds,
        eval_seconds_per_1k_tokens=None if eval_seconds is None else eval_seconds * 1000.0 / n_run)


def evaluate_gguf(gguf_path: Path, reference: EvalReference, *, threads: int | None = None,
                  progress: Progress | None = None) -> QualityReport:
    """Run the GGUF (llama.cpp) over the reference's chunks, one at a time, and score it. The
    time reported covers loading the model and every chunk."""
    from .runtime import chunk_logits, eval_llama

    start = time.monotonic()
    with eval_llama(Path(gguf_path), n_ctx=reference.n_ctx, threads=threads) as llm:
        if int(llm.n_vocab()) != reference.n_vocab:
            raise ValidationFailed(f"{Path(gguf_path).name} has a vocabulary of {llm.n_vocab()}, the evaluation "
                                   f"reference {reference.n_vocab}: it belongs to another model",
                                   details={"n_vocab": int(llm.n_vocab()), "reference_n_vocab": reference.n_vocab})
        chunk_iter = chunk_logits(llm, reference.tokens, progress)
        report = score_logits(reference, chunk_iter)
    seconds = time.monotonic() - start
    return QualityReport(**{**asdict(report), "eval_seconds": seconds,
                            "eval_seconds_per_1k_tokens": seconds * 1000.0 / (reference.n_chunks * reference.n_ctx)})


__all__ = ["QualityReport", "score_logits", "evaluate_gguf"]
