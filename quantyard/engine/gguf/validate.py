"""Check a written GGUF against its source with independent runtimes.

1. gguf-py re-opens it and finds every tensor we meant to write.
2. llama.cpp loads it, tokenizes a probe text exactly as the HF tokenizer does, and its logits
   on that text are close to transformers' float32 logits on the source folder.
Any failed check raises ValidationFailed carrying the numbers; nothing here only warns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ValidationFailed

PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A llama lives in high mountains, "
    "eats grass and weighs 130 kg; quantization maps weights to small integers: 3.14 + 42 = 45.14!"
)


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


def check_reopens(path: Path, expected_tensors: int) -> int:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # any parse failure means the file is unusable
        raise ValidationFailed(f"gguf-py cannot re-open {path.name}: {e}") from e
    n = len(reader.tensors)
    if n != expected_tensors:
        raise ValidationFailed(f"{path.name} holds {n} tensors, expected {expected_tensors}",
                               details={"tensor_count": n, "expected": expected_tensors})
    return n


def hf_reference(source_dir: Path, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids and float32 logits from transformers on the source folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source_dir)(text).input_ids
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
    finally:
        del model
    return list(ids), logits


@contextlib.contextmanager
def llama_model(path: Path, n_ctx: int):
    """A llama.cpp model with logits for every position; always freed afterwards.

    The KV cache is kept in F32 (llama.cpp defaults to F16): we measure the artifact, not the
    runtime's cache rounding, which alone moves logits by ~0.01 on a sharp model."""
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                              n_ubatch=n_ctx, type_k=llama_cpp.GGML_TYPE_F32,
                              type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    except Exception as e:
        raise ValidationFailed(f"llama.cpp cannot load {path.name}: {e}") from e
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
    top2 = np.sort(reference, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > margin


def compare_logits(reference: np.ndarray, candidate: np.ndarray, tie_margin: float = 0.02) -> dict[str, float]:
    """top-1 agreement (all positions and decisive ones), max |Δlogit|, mean/max per-token
    KL(reference || candidate)."""
    if reference.shape != candidate.shape:
        raise ValidationFailed(f"logit shapes differ: transformers {reference.shape}, llama.cpp {candidate.shape}")
    lp, lq = _log_softmax(reference), _log_softmax(candidate)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    same = reference.argmax(-1) == candidate.argmax(-1)
    decisive = _decisive(reference, tie_margin)
    return {
        "top1_agreement": float(same.mean()),
        "top1_agreement_decisive": float(same[decisive].mean()) if decisive.any() else 1.0,
        "max_abs_logit_diff": float(np.abs(reference - candidate).max()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
    }


def check_metrics(metrics: dict[str, float], quantization: str) -> None:
    t = THRESHOLDS[quantization]
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


def validate_gguf(path: Path, source_dir: Path, quantization: str, expected_tensors: int) -> dict:
    """Run every check; return the metrics recorded with the artifact."""
    tensor_count = check_reopens(path, expected_tensors)
    hf_ids, hf_logits = hf_reference(source_dir, PROBE_TEXT)
    ll_ids, ll_logits = llama_reference(path, PROBE_TEXT, n_ctx=max(64, len(hf_ids) + 8))
    if ll_ids != hf_ids:
        raise ValidationFailed("llama.cpp tokenizes the probe text differently from the source tokenizer",
                               details={"transformers_ids": hf_ids, "llama_cpp_ids": ll_ids})
    metrics = compare_logits(hf_logits, ll_logits)
    check_metrics(metrics, quantization)
    metrics.update({"probe_tokens": len(hf_ids), "tokenization_match": True, "tensor_count": tensor_count})
    return metrics


__all__ = ["validate_gguf", "compare_logits", "check_metrics", "THRESHOLDS", "PROBE_TEXT",
           "hf_reference", "llama_reference", "check_reopens"]
