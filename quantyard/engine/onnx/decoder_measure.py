"""Generation speed of a decoder artifact on this machine (onnxruntime CPU provider, batch 1).

Each decode step (one new token, the cache fed back) is timed on its own, so the per-token
latency does not include the prompt's prefill, which is reported apart.
"""

from __future__ import annotations

import time
from pathlib import Path


def _one_run(decoder, ids, new_tokens: int) -> tuple[float, list[float]]:
    """(prefill seconds, seconds of each following decode step) of one greedy generation."""
    import numpy as np

    mask = np.ones_like(ids)
    past = decoder.empty_past(1)
    start = time.perf_counter()
    logits, past = decoder.step(ids, mask, past)
    prefill = time.perf_counter() - start
    steps = []
    for _ in range(new_tokens - 1):
        token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        start = time.perf_counter()
        logits, past = decoder.step(token, mask, past)
        steps.append(time.perf_counter() - start)
    return prefill, steps


def measure_generation(path: Path, tokenizer, prompt: str, *, new_tokens: int = 20, runs: int = 3) -> dict:
    """p50/p90 latency per generated token, tokens/s of the decode loop, prefill latency."""
    import numpy as np
    import onnxruntime as ort

    from .generate import OnnxDecoder

    decoder = OnnxDecoder(path)
    ids = np.asarray(tokenizer([prompt], return_tensors="np")["input_ids"], dtype=np.int64)
    new_tokens = max(new_tokens, 2)
    _one_run(decoder, ids, 2)  # warm-up: first runs allocate and pick kernels
    prefills, steps = [], []
    for _ in range(runs):
        prefill, timed = _one_run(decoder, ids, new_tokens)
        prefills.append(prefill)
        steps += timed
    steps_arr = np.array(steps)
    return {"latency_ms_p50": float(np.percentile(steps_arr, 50) * 1e3),
            "latency_ms_p90": float(np.percentile(steps_arr, 90) * 1e3),
            "latency_of": "one generated token (decode step with key/value cache), batch 1",
            "tokens_per_s": float(len(steps_arr) / steps_arr.sum()),
            "prefill_latency_ms_p50": float(np.percentile(prefills, 50) * 1e3),
            "prefill_tokens": int(ids.shape[1]), "timing_runs": runs, "timed_tokens_per_run": new_tokens - 1,
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider"}


__all__ = ["measure_generation"]
