"""Quality reports of ONNX decoders (engine/onnx/evaluate.py) against the source's EvalReference,
checked with the test's own oracle: transformers' full-vocabulary logits vs onnxruntime's on the
reference's chunks, KL and top-1 computed here in numpy (not through the engine's scorer)."""

from __future__ import annotations

import numpy as np
import pytest

from quantyard.engine.spec import TargetSpec
from tests.fixtures.models import arch_model

N_CTX, CHUNKS = 64, 3


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    from quantyard.engine.evaluation.reference import compute_eval_reference
    from quantyard.engine.onnx import convert_onnx, quantize_from_fp32

    model_dir = arch_model("llama")
    out = tmp_path_factory.mktemp("onnx-eval")
    fp32 = convert_onnx(model_dir, TargetSpec("onnx", "fp32"), out / "fp32")
    int8 = quantize_from_fp32(model_dir, fp32.path, TargetSpec("onnx", "int8-dynamic"), out / "int8")
    ref = compute_eval_reference(model_dir, n_ctx=N_CTX, max_chunks=CHUNKS)
    return model_dir, fp32.path, int8.path, ref


def _bucket_kl(lp, lq, top_ids):
    """KL over the reference's top-k tokens plus one bucket for the rest of the vocabulary (what
    a top-k reference, like llama.cpp's KL base file, can measure)."""
    rows = np.arange(len(lp))[:, None]
    p, q = np.exp(lp[rows, top_ids]), np.exp(lq[rows, top_ids])
    p_rest, q_rest = np.clip(1 - p.sum(1), 1e-300, None), np.clip(1 - q.sum(1), 1e-300, None)
    return (p * (np.log(p) - np.log(q))).sum(1) + p_rest * (np.log(p_rest) - np.log(q_rest))


def _oracle(model_dir, onnx_path, tokens, top_ids):
    """(mean KL(source || artifact) over the scored positions: full vocabulary, top-k + rest;
    top-1 agreement), from transformers' and onnxruntime's own logits."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    kls, buckets, same = [], [], []
    first = N_CTX // 2
    per = N_CTX - first - 1
    for c, chunk in enumerate(tokens):
        ids = chunk[None].astype(np.int64)
        with torch.no_grad():
            p = model(torch.from_numpy(ids)).logits[0, first:-1].double().numpy()
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(N_CTX)[None]}
        for i in sess.get_inputs():
            if i.name.startswith("past_key_values."):
                feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        q = sess.run(["logits"], feeds)[0][0, first:-1].astype(np.float64)
        lp = p - np.logaddexp.reduce(p, axis=1, keepdims=True)
        lq = q - np.logaddexp.reduce(q, axis=1, keepdims=True)
        kls.append((np.exp(lp) * (lp - lq)).sum(1))
        buckets.append(_bucket_kl(lp, lq, top_ids[c * per:(c + 1) * per]))
        same.append(p.argmax(1) == q.argmax(1))
    return tuple(float(np.concatenate(x).mean()) for x in (kls, buckets, same))


def test_fp32_decoder_report_is_lossless(decoder):
    from quantyard.engine.onnx.evaluate import evaluate_onnx_decoder

    _, fp32, _, ref = decoder
    r = evaluate_onnx_decoder(fp32, ref)
    assert (r.n_ctx, r.n_chunks, r.n_tokens) == (N_CTX, CHUNKS, CHUNKS * (N_CTX // 2 - 1))
    assert r.mean_kl < 1e-4 and r.top1_agreement > 0.99 and abs(r.ppl_ratio - 1) < 1e-3
    assert r.eval_seconds > 0 and r.to_dict()["ppl_source"] == pytest.approx(ref.source_ppl, rel=1e-6)


def test_int8_decoder_report_matches_a_full_vocabulary_oracle(decoder):
    from quantyard.engine.onnx.evaluate import evaluate_onnx_decoder

    model_dir, _, int8, ref = decoder
    r = evaluate_onnx_decoder(int8, ref)
    kl, bucket_kl, top1 = _oracle(model_dir, int8, ref.tokens, ref.top_ids)
    assert bucket_kl > 1e-4  # int8 changes the distribution: a report of zero would be wrong
    # the reference keeps the top-k exactly and a systematic sample of the tail (fd4c68f): the
    # report estimates the full-vocabulary KL, which the top-k + rest bucket KL only bounds below
    # (measured: report 0.000958, full 0.000960, bucket 0.000523; with the plain tail mean
    # instead of report.py's control variate the report was 0.00132: its noise on these flat
    # distributions was a third of the KL)
    assert r.mean_kl == pytest.approx(kl, rel=0.02)
    assert bucket_kl <= kl * 1.0001
    assert abs(r.top1_agreement - top1) <= 1.0 / r.n_tokens


def test_encoder_report_on_heldout_sentences(minilm_dir, minilm_fp32_onnx):
    from quantyard.engine.onnx.evaluate import evaluate_onnx_encoder
    from quantyard.engine.onnx.heldout import HELDOUT_SENTENCES

    r = evaluate_onnx_encoder(minilm_fp32_onnx.path, minilm_dir)
    assert r["sentences"] == len(HELDOUT_SENTENCES) and r["cosine_of"] == "mean-pooled sentence embeddings"
    assert r["cosine_min"] > 0.99999 and r["max_abs_diff"] < 1e-3 and r["worst_sentence"] in HELDOUT_SENTENCES
