"""int8-dynamic on the real all-MiniLM-L6-v2 against PyTorch, on sentences no part of the
conversion sees (engine/onnx/heldout.py: not calibration, not validation).

Oracle: transformers in float32, mean-pooled sentence embeddings (sentence-transformers' pooling
for this model), each sentence alone (batch 1, where short inputs are hardest for int8).
The bar: a published third-party int8 export of the same size reaches worst-case cosine 0.996.
"""

from __future__ import annotations

import numpy as np
import pytest

from quantyard.engine.onnx.heldout import HELDOUT_SENTENCES
from quantyard.engine.spec import TargetSpec

THIRD_PARTY_WORST_COSINE = 0.996
THIRD_PARTY_SIZE = 22.9e6


def _torch_pooled(model_dir, texts):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    for text in texts:
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            states = model(**enc).last_hidden_state.double()
        mask = enc["attention_mask"][..., None].double()
        out.append(((states * mask).sum(1) / mask.sum(1))[0].numpy())
    return tok, np.stack(out)


def _ort_pooled(path, tok, texts, *, batched=False):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    batches = [list(texts)] if batched else [[t] for t in texts]
    out = []
    for batch in batches:
        enc = tok(batch, padding=True, return_tensors="np")
        states = sess.run(None, {n: enc[n].astype(np.int64) for n in names})[0].astype(np.float64)
        mask = enc["attention_mask"][..., None].astype(np.float64)
        out.extend((states * mask).sum(1) / mask.sum(1))
    return np.stack(out)


def _cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def reference(minilm_dir):
    return _torch_pooled(minilm_dir, HELDOUT_SENTENCES)


def _quantize(minilm_dir, fp32, out, **params):
    from quantyard.engine.onnx import quantize_from_fp32

    return quantize_from_fp32(minilm_dir, fp32.path, TargetSpec("onnx", "int8-dynamic", params), out)


def test_int8_dynamic_reaches_the_third_party_bar_on_heldout_sentences(minilm_dir, minilm_fp32_onnx, reference,
                                                                       tmp_path):
    tok, ref = reference
    r = _quantize(minilm_dir, minilm_fp32_onnx, tmp_path)
    q = r.metadata["quantization"]
    assert q["activation_scales"] == "row" and q["row_quantized_matmuls"] == 36
    assert q["row_quantized_embeddings"] >= 1 and q["float_outlier_channels"] > 0
    # about the same size as the third-party export (all weights int8, embeddings included)
    assert r.size_bytes < 1.06 * THIRD_PARTY_SIZE and r.metrics["compression_vs_fp32"] > 3.7
    cos = _cosines(_ort_pooled(r.path, tok, HELDOUT_SENTENCES), ref)
    worst = HELDOUT_SENTENCES[int(cos.argmin())]
    assert cos.min() >= THIRD_PARTY_WORST_COSINE, f"worst {cos.min():.5f} on {worst!r}"
    # one scale per token row: a sentence's embedding does not depend on its batch's padding
    batched = _ort_pooled(r.path, tok, HELDOUT_SENTENCES, batched=True)
    assert _cosines(batched, ref).min() >= THIRD_PARTY_WORST_COSINE


def test_per_tensor_scales_miss_the_bar(minilm_dir, minilm_fp32_onnx, reference, tmp_path):
    """The previous recipe (smoothing + one scale per tensor) on the same sentences: the gap
    the row scales close, so the test above measures something."""
    tok, ref = reference
    r = _quantize(minilm_dir, minilm_fp32_onnx, tmp_path, activation_scales="tensor")
    q = r.metadata["quantization"]
    assert q["activation_scales"] == "tensor" and q["smoothing"]["smoothed_activations"] > 0
    cos = _cosines(_ort_pooled(r.path, tok, HELDOUT_SENTENCES), ref)
    assert 0.98 < cos.min() < THIRD_PARTY_WORST_COSINE
