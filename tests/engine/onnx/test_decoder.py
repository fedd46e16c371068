"""Decoder LLMs with past key/values: greedy generation in onnxruntime (our loop, feeding the
present key/values back) must equal transformers' `generate(do_sample=False)` token for token.

The oracle is transformers itself, run here on prompts the exporter never saw (its example
inputs are random ids), in a left-padded batch so masks and positions are exercised too."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.fixtures.models import arch_model

PROMPTS = ["The quick brown fox", "def main ( ) : return x + y * 2 ; for i in range ( 10 ) :"]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    """{family: (model dir, onnx path, export info)}, each exported once."""
    from quantyard.engine.onnx.decoder import export_decoder, load_causal_lm

    out = {}
    root = tmp_path_factory.mktemp("decoders")
    for family, model_dir in (("llama", tiny_llama_dir), ("gpt2", arch_model("gpt2"))):
        model, _ = load_causal_lm(model_dir)
        path = root / f"{family}.onnx"
        out[family] = (model_dir, path, export_decoder(model, path))
    return out


def _transformers_greedy(model_dir, prompts):
    """transformers' own greedy generation: (sequences, first-step scores, feeds, eos, pad)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # default attention
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id,
                             output_scores=True, return_dict_in_generate=True)
    return (ref.sequences.numpy(), ref.scores[0].numpy(), enc["input_ids"].numpy(), enc["attention_mask"].numpy(),
            model.generation_config.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("batch", [1, 2], ids=["single", "left-padded-pair"])
def test_greedy_generation_equals_transformers(exported, family, batch):
    from quantyard.engine.onnx.generate import greedy_generate

    model_dir, path, info = exported[family]
    assert info["exporter"].startswith("torch.onnx dynamo")
    ref_seq, ref_first, ids, mask, eos, pad = _transformers_greedy(model_dir, PROMPTS[:batch])
    if batch == 2:
        assert (mask == 0).any()  # the shorter prompt really is padded
    got = greedy_generate(path, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad)
    assert ref_seq.shape == (batch, ids.shape[1] + NEW_TOKENS)  # no early stop: 20 real steps
    np.testing.assert_array_equal(got.sequences, ref_seq)
    assert float(np.abs(got.first_logits - ref_first).max()) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_graph_signature_has_dynamic_axes(exported, family):
    _, path, info = exported[family]
    graph = onnx.load(str(path), load_external_data=False).graph
    layers = info["layers"]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [o.name for o in graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"][0] == "batch" and isinstance(dims["attention_mask"][1], str)
    past = dims["past_key_values.0.key"]
    assert past[0] == "batch" and past[2] == "past_sequence" and all(isinstance(d, int) for d in (past[1], past[3]))
    assert info["check_max_abs_diff"] < 1e-4
