"""An ONNX artifact against its PyTorch source: same sentences, compared in numbers.

A check outside tolerance raises ValidationFailed carrying the measured values; it is never a
warning (Optimum's exporter only warns, and drifted models ship).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import ValidationFailed


def session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_outputs(model, tokenizer, names: Sequence[str], output: str, texts: Sequence[str]):
    """Reference outputs (numpy) and the numpy feeds that produced them."""
    import numpy as np
    import torch

    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = getattr(model(**{n: enc[n] for n in names}), output).float().numpy()
    feeds = {n: enc[n].numpy().astype(np.int64) for n in names}
    return ref, feeds


def _row_cosine(a, b):
    import numpy as np

    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def compare(out, ref, attention_mask) -> dict:
    """Numbers for one batch. For token outputs, padded positions are left out: their values are
    arbitrary in both runtimes and no consumer reads them."""
    import numpy as np

    if out.shape != ref.shape:
        raise ValidationFailed(f"output shape {out.shape} differs from the source's {ref.shape}")
    if not np.isfinite(out).all():
        raise ValidationFailed("the ONNX output holds NaN or infinity", details={"finite": False})
    if not np.isfinite(ref).all():  # a reference that is not a number validates nothing
        raise ValidationFailed("the PyTorch source's output holds NaN or infinity", details={"finite": False})
    if out.ndim == 3:  # (batch, sequence, hidden): token states
        mask = attention_mask.astype(bool)
        tok_out, tok_ref = out[mask], ref[mask]
        weights = attention_mask[..., None].astype(np.float64)
        pooled_out = (out * weights).sum(1) / weights.sum(1)
        pooled_ref = (ref * weights).sum(1) / weights.sum(1)
        return {"max_abs_diff": float(np.abs(tok_out - tok_ref).max()),
                "cosine_min": float(_row_cosine(pooled_out, pooled_ref).min()),
                "token_cosine_min": float(_row_cosine(tok_out, tok_ref).min()),
                "cosine_of": "mean-pooled sentence embeddings"}
    return {"max_abs_diff": float(np.abs(out - ref).max()),
            "cosine_min": float(_row_cosine(out, ref).min()), "cosine_of": "output rows"}


def validate(path: Path, ref, feeds: dict, *, max_abs_diff: float, min_cosine: float) -> dict:
    """Run the artifact on `feeds`, compare with `ref`; ValidationFailed when out of tolerance."""
    try:
        out = session(path).run(None, feeds)[0]
    except Exception as e:  # onnxruntime raises its own exception types; all mean "doesn't run"
        raise ValidationFailed(f"onnxruntime cannot run {Path(path).name}: {str(e)[:400]}") from e
    from ..gguf.quality import require_finite

    numbers = compare(out, ref, feeds.get("attention_mask"))
    require_finite(numbers, Path(path).name)  # NaN compares False with every tolerance
    numbers.update(tolerance_max_abs_diff=max_abs_diff, tolerance_min_cosine=min_cosine,
                   samples=int(ref.shape[0]))
    failures = []
    if not numbers["max_abs_diff"] <= max_abs_diff:
        failures.append(f"max abs diff {numbers['max_abs_diff']:.6g} > tolerance {max_abs_diff:.6g}")
    if not numbers["cosine_min"] >= min_cosine:
        failures.append(f"cosine similarity {numbers['cosine_min']:.6f} < tolerance {min_cosine:.6f} "
                        f"({numbers['cosine_of']})")
    if failures:
        raise ValidationFailed(f"{Path(path).name} does not match its PyTorch source: " + "; ".join(failures),
                               details=numbers)
    return numbers


__all__ = ["validate", "compare", "torch_outputs", "session"]
