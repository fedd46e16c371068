"""Quality reports for ONNX artifacts, beside validation (which only passes or fails).

- Decoders: the same report as a GGUF's (engine/evaluation), scored by the shared
  `score_logits` against the source's stored EvalReference: onnxruntime runs each reference
  chunk in one prefill step (empty past), so the positions are those llama-perplexity scores.
- Encoders: PyTorch vs onnxruntime on the held-apart sentences (heldout.py), each sentence
  alone: cosine of mean-pooled embeddings (or of the logits rows, classification heads), worst
  and mean, and the largest difference over real tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .heldout import HELDOUT_SENTENCES

if TYPE_CHECKING:
    import numpy as np

    from ..evaluation.reference import EvalReference
    from ..evaluation.report import QualityReport

Progress = Callable[[float, str], None]


def _empty_past(sess, batch: int) -> dict:
    """Zero-length past tensors of the graph's own dtype and (kv heads, head dim)."""
    import numpy as np

    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            heads, head_dim = i.shape[1], i.shape[3]
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros((batch, heads, 0, head_dim), dtype)
    return feeds


def decoder_chunk_logits(onnx_path: Path, chunks: np.ndarray, progress: Progress | None = None) -> Iterator:
    """float32 logits [n_ctx - first, n_vocab] of positions first..n_ctx-1 of each chunk."""
    import numpy as np

    from ..evaluation.chunks import first_scored
    from .validate import session

    sess = session(Path(onnx_path))
    n_chunks, n_ctx = chunks.shape
    first = first_scored(n_ctx)
    past = _empty_past(sess, 1)
    names = {i.name for i in sess.get_inputs()}
    for c in range(n_chunks):
        feeds = {"input_ids": chunks[c : c + 1].astype(np.int64), **past}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones((1, n_ctx), np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(n_ctx, dtype=np.int64)[None]
        (logits,) = sess.run(["logits"], feeds)
        yield np.asarray(logits[0, first:], dtype=np.float32)
        if progress is not None:
            progress((c + 1) / n_chunks, f"evaluation chunk {c + 1}/{n_chunks}")


def evaluate_onnx_decoder(onnx_path: Path, reference: EvalReference, *,
                          progress: Progress | None = None) -> QualityReport:
    """A decoder ONNX's quality report against the source's reference (as evaluate_gguf)."""
    from ..evaluation.report import QualityReport, score_logits

    start = time.monotonic()
    report = score_logits(reference, decoder_chunk_logits(Path(onnx_path), reference.tokens, progress))
    seconds = time.monotonic() - start
    return QualityReport(**{**asdict(report), "eval_seconds": seconds,
                            "eval_seconds_per_1k_tokens": seconds * 1000.0 / (reference.n_chunks * reference.n_ctx)})


def evaluate_onnx_encoder(onnx_path: Path, source: Path, *, texts: Sequence[str] = HELDOUT_SENTENCES) -> dict:
    """An encoder ONNX against its PyTorch source on sentences no conversion step saw."""
    import numpy as np

    from .convert import load
    from .validate import compare, session, torch_outputs

    start = time.monotonic()
    loaded = load(Path(source))
    sess = session(Path(onnx_path))
    cosines, diffs, token_cos = [], [], []
    for text in texts:
        ref, feeds = torch_outputs(loaded.model, loaded.tokenizer, loaded.names, loaded.output, [text])
        numbers = compare(sess.run(None, feeds)[0], ref, feeds.get("attention_mask"))
        cosines.append(numbers["cosine_min"])
        diffs.append(numbers["max_abs_diff"])
        token_cos.append(numbers.get("token_cosine_min", numbers["cosine_min"]))
    worst = int(np.argmin(cosines))
    return {"sentences": len(texts), "batch": 1, "cosine_of": numbers["cosine_of"],
            "cosine_min": float(cosines[worst]), "cosine_mean": float(np.mean(cosines)),
            "worst_sentence": texts[worst], "max_abs_diff": float(max(diffs)),
            "token_cosine_min": float(min(token_cos)), "eval_seconds": time.monotonic() - start}


__all__ = ["decoder_chunk_logits", "evaluate_onnx_decoder", "evaluate_onnx_encoder"]
