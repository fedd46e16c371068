"""The BERT family beyond BertModel: RoBERTa, DistilBERT, XLM-RoBERTa and the sequence-
classification heads. Each tiny random model goes to fp32, int8-dynamic and fp16 through the
engine (which validates each artifact), and is re-checked here with onnxruntime vs transformers
on sentences the engine never saw, in one padded batch that is longer than any the engine used."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantyard.engine.manifest import supported_architectures
from quantyard.engine.onnx.manifest import SUPPORTED, TASKS
from quantyard.engine.spec import TargetSpec
from tests.fixtures.onnx_encoders import LAYERS

from .oracle import ORACLE_TEXTS

ARCHITECTURES = [
    "BertForSequenceClassification",
    "RobertaModel",
    "RobertaForSequenceClassification",
    "DistilBertModel",
    "DistilBertForSequenceClassification",
    "XLMRobertaModel",
]
# RoBERTa and DistilBERT tokenizers emit no token_type_ids, and DistilBERT's forward takes none
INPUTS = {"Bert": ["input_ids", "attention_mask", "token_type_ids"]}
LONG = ("A much longer sentence, so that the batch here is longer than any the engine exported or validated "
        "with: positions past those lengths must come out of the exported graph right as well, 42 times over.")
TEXTS = [*ORACLE_TEXTS, LONG]


def _oracle(onnx_path, model_dir, architecture: str):
    """(ORT output, transformers output, attention mask) on TEXTS, one padded batch."""
    import onnxruntime as ort
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = getattr(transformers, architecture).from_pretrained(model_dir).eval()
    enc = tok(TEXTS, padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    out = sess.run(None, feeds)[0]
    name = "logits" if architecture.endswith("ForSequenceClassification") else "last_hidden_state"
    with torch.no_grad():
        ref = getattr(model(**{k: torch.from_numpy(v) for k, v in feeds.items()}), name).numpy()
    return out, ref, enc["attention_mask"]


def _diff_and_cosine(out, ref, mask) -> tuple[float, float]:
    """Max abs diff over real tokens (or logits), worst cosine of pooled embeddings (or logits rows)."""
    if out.ndim == 3:
        w = mask[..., None].astype(np.float64)
        diff = float(np.abs(out[mask.astype(bool)] - ref[mask.astype(bool)]).max())
        out, ref = (out * w).sum(1) / w.sum(1), (ref * w).sum(1) / w.sum(1)
    else:
        diff = float(np.abs(out - ref).max())
    cos = (out * ref).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    return diff, float(cos.min())


def test_manifest_lists_what_is_tested_here():
    listed = supported_architectures("onnx")
    assert set(ARCHITECTURES) <= set(listed) and set(ARCHITECTURES) <= set(SUPPORTED)
    assert all(TASKS[a] == "sequence-classification" for a in ARCHITECTURES if a.endswith("Classification"))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_encoder_fp32_int8_fp16(tiny_encoder, tmp_path, architecture):
    from quantyard.engine.onnx import convert_onnx, quantize_from_fp32

    src = tiny_encoder(architecture)
    fp32 = convert_onnx(src, TargetSpec("onnx", "fp32"), tmp_path / "fp32")
    head = architecture.endswith("ForSequenceClassification")
    assert fp32.metadata["architecture"] == architecture
    assert fp32.metadata["output"] == ("logits" if head else "last_hidden_state")
    family = architecture.split("For")[0].removesuffix("Model")
    assert sorted(fp32.metadata["inputs"]) == sorted(INPUTS.get(family, ["input_ids", "attention_mask"]))
    fused = fp32.metadata["fused_operators"]
    # onnxruntime's BERT fusions apply to the whole family: every layer's two residual + layer
    # norms and its GELU are fused (attention is not: the dynamo export's SDPA pattern isn't
    # one the optimizer matches, for BertModel as well)
    assert fused.get("SkipLayerNormalization") == 2 * LAYERS and fused.get("BiasGelu") == LAYERS, fused
    out, ref, mask = _oracle(fp32.path, src, architecture)
    assert out.shape == ref.shape and out.shape[0] == len(TEXTS)
    diff, cos = _diff_and_cosine(out, ref, mask)
    assert diff < 1e-4 and cos > 0.99999

    int8 = quantize_from_fp32(src, fp32.path, TargetSpec("onnx", "int8-dynamic"), tmp_path / "int8")
    ops = {n.op_type for n in onnx.load(str(int8.path), load_external_data=False).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"} & ops, ops
    assert int8.metrics["cosine_min"] >= 0.99 and int8.metrics["compression_vs_fp32"] > 2.5
    diff, cos = _diff_and_cosine(*_oracle(int8.path, src, architecture))
    assert cos >= 0.99 and diff < 1.0, (diff, cos)

    fp16 = quantize_from_fp32(src, fp32.path, TargetSpec("onnx", "fp16"), tmp_path / "fp16")
    assert 1.8 < fp16.metrics["compression_vs_fp32"] < 2.1
    diff, cos = _diff_and_cosine(*_oracle(fp16.path, src, architecture))
    assert diff < 2e-2 and cos > 0.9999, (diff, cos)
