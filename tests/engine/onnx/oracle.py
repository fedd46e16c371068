"""The test's own oracle: onnxruntime on the artifact vs transformers on the source, with
sentences the engine's validation never sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ORACLE_TEXTS = [
    "Edge devices need small, fast models.",
    "A dog runs across the green field chasing a red ball while children laugh nearby.",
    "Hello!",
]


def embeddings(onnx_path: Path, model_dir: Path, texts=ORACLE_TEXTS):
    """(token states from ORT, from torch, attention mask), padded batch of 3."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tok(texts, padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    out = sess.run(None, feeds)[0]
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    return out, ref, enc["attention_mask"]


def pooled_cosines(out, ref, mask) -> np.ndarray:
    w = mask[..., None].astype(np.float64)
    a, b = (out * w).sum(1) / w.sum(1), (ref * w).sum(1) / w.sum(1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def max_diff_real_tokens(out, ref, mask) -> float:
    m = mask.astype(bool)
    return float(np.abs(out[m] - ref[m]).max())
