"""Speed of an artifact on this machine, with onnxruntime's CPU provider."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path


def _feeds(tokenizer, names: Sequence[str], texts: Sequence[str]) -> dict:
    import numpy as np

    enc = tokenizer(list(texts), padding=True, return_tensors="np")
    return {n: enc[n].astype(np.int64) for n in names}


def _timings(sess, feeds: dict, runs: int) -> list[float]:
    sess.run(None, feeds)  # warm-up: first run allocates and picks kernels
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return times


def measure(path: Path, tokenizer, names: Sequence[str], *, latency_text: str, batch_texts: Sequence[str],
            runs: int = 20) -> dict:
    """p50/p90 latency at batch 1 and throughput (sequences/s) on a padded batch."""
    import numpy as np
    import onnxruntime as ort

    from .validate import session

    sess = session(path)
    single = np.array(_timings(sess, _feeds(tokenizer, names, [latency_text]), runs))
    batch = _timings(sess, _feeds(tokenizer, names, batch_texts), max(3, runs // 4))
    return {"latency_ms_p50": float(np.percentile(single, 50) * 1e3),
            "latency_ms_p90": float(np.percentile(single, 90) * 1e3),
            "throughput_seq_per_s": float(len(batch_texts) * len(batch) / sum(batch)),
            "throughput_batch": len(batch_texts), "timing_runs": runs,
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider"}


__all__ = ["measure"]
