"""engine/hf/strict_load.py and the GGUF converter's tensor accounting: a source model is only
ever used when every tensor of the upload lands in it and every parameter of it comes from the
upload, finite. Legitimate differences (tied heads, recomputed buffers, base-model prefixes)
still load: real models (MiniLM, SmolLM2) and every tiny architecture fixture are the oracle."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from quantyard.engine.errors import InvalidModel, ValidationFailed
from tests.fixtures.models import ARCH_FIXTURES, arch_model


def tampered_copy(src: Path, dst: Path, edit: Callable[[dict], dict] | None = None,
                  config: Callable[[dict], dict] | None = None) -> Path:
    """A copy of the model folder `src` at `dst` with its tensors passed through `edit`
    ({name: torch tensor} -> same) and/or its config.json through `config`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit is not None:
        tensors = edit({k: v.clone() for k, v in load_file(src / "model.safetensors").items()})
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(cfg)))
    return dst


def llama_config_over_gpt2(dst: Path) -> Path:
    """GPT-2's tensors and tokenizer under a config.json that says LlamaForCausalLM (dims of the
    tiny Llama fixture, GPT-2's vocab): transformers would load it with random weights."""
    gpt2 = arch_model("gpt2")
    llama = json.loads((arch_model("llama") / "config.json").read_text())
    vocab = json.loads((gpt2 / "config.json").read_text())["vocab_size"]
    return tampered_copy(gpt2, dst, config=lambda _: {**llama, "vocab_size": vocab})


def with_value(name: str, value: float):
    def edit(t: dict) -> dict:
        t[name].view(-1)[3] = value
        return t
    return edit


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    from quantyard.engine.hf.strict_load import load_pretrained

    return load_pretrained(AutoModelForCausalLM, path)


# ---- legitimate models load ---------------------------------------------------------------


@pytest.mark.parametrize("family", ARCH_FIXTURES)
def test_every_architecture_fixture_loads_and_equals_its_files(family):
    """Tied heads (qwen2, gemma, gpt2), fused projections (phi3), offsets (gemma): all accepted,
    and the loaded parameters are the file's tensors bit for bit (independent reader)."""
    from safetensors.numpy import load_file

    model = _load(arch_model(family))
    files = load_file(arch_model(family) / "model.safetensors")
    state = model.state_dict()
    for name, array in files.items():
        np.testing.assert_array_equal(state[name].float().numpy(), array.astype(np.float32), err_msg=name)


def test_minilm_with_position_ids_buffer_and_pooling_files_loads(minilm_dir):
    from transformers import AutoModel

    from quantyard.engine.hf.strict_load import load_pretrained, source_tensors

    assert "embeddings.position_ids" in source_tensors(minilm_dir)  # an old-style buffer in the file
    assert (minilm_dir / "1_Pooling").is_dir()
    model = load_pretrained(AutoModel, minilm_dir)
    assert type(model).__name__ == "BertModel"


def test_sharded_source_loads(tiny_llama_sharded_dir):
    assert _load(tiny_llama_sharded_dir) is not None


def test_recomputed_buffers_in_the_file_are_allowed(tmp_path):
    """Old GPT-2 checkpoints carry the causal-mask buffers and Llama ones rotary inv_freq."""
    import torch

    def add(t):
        t["transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
        t["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
        return t

    _load(tampered_copy(arch_model("gpt2"), tmp_path / "m", add))


# ---- fooled models are refused, naming the tensors --------------------------------------------


def test_llama_config_over_gpt2_tensors_is_refused(tmp_path):
    with pytest.raises(InvalidModel) as err:
        _load(llama_config_over_gpt2(tmp_path / "m"))
    e = err.value
    assert "model.safetensors" in e.message and "transformer.h.0.attn.c_attn.weight" in e.message
    assert e.details["file"] == "model.safetensors" and e.details["count"] >= 20
    assert str(tmp_path) not in e.message


def test_extra_tensor_is_refused(tmp_path):
    import torch

    def add(t):
        t["model.layers.0.mlp.secret.weight"] = torch.zeros(4, 4)
        return t

    with pytest.raises(InvalidModel, match=r"model\.layers\.0\.mlp\.secret\.weight") as err:
        _load(tampered_copy(arch_model("llama"), tmp_path / "m", add))
    assert err.value.details["reason"] == "unused_tensors"


def test_missing_tensor_is_refused(tmp_path):
    def drop(t):
        del t["model.layers.1.self_attn.k_proj.weight"]
        return t

    with pytest.raises(InvalidModel, match=r"model\.layers\.1\.self_attn\.k_proj\.weight") as err:
        _load(tampered_copy(arch_model("llama"), tmp_path / "m", drop))
    assert err.value.details["reason"] == "missing_tensors" and "random" in err.value.message


def test_renamed_tensor_is_refused(tmp_path):
    def rename(t):
        t["model.layers.0.mlp.up_projection.weight"] = t.pop("model.layers.0.mlp.up_proj.weight")
        return t

    with pytest.raises(InvalidModel, match=r"up_projection\.weight|up_proj\.weight"):
        _load(tampered_copy(arch_model("llama"), tmp_path / "m", rename))


def test_untied_head_missing_is_refused(tmp_path):
    """Llama's config says tie_word_embeddings false: no lm_head means a random head."""
    def drop(t):
        del t["lm_head.weight"]
        return t

    with pytest.raises(InvalidModel, match=r"lm_head\.weight"):
        _load(tampered_copy(arch_model("llama"), tmp_path / "m", drop))


def test_tied_head_with_other_values_keeps_both(tmp_path):
    """Qwen2 says tie_word_embeddings, but the file stores an lm_head with other values:
    transformers then unties them, so both tensors are used (as llama.cpp uses output.weight);
    the value check proves neither was discarded."""
    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] * 2
        return t

    model = _load(tampered_copy(arch_model("qwen2"), tmp_path / "m", add))
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    assert head.data_ptr() != embed.data_ptr()
    assert bool((head == embed * 2).all())


def test_wrong_shape_is_refused(tmp_path):
    import torch

    def grow(t):
        t["model.norm.weight"] = torch.ones(300)
        return t

    with pytest.raises(InvalidModel, match=r"model\.norm\.weight"):
        _load(tampered_copy(arch_model("llama"), tmp_path / "m", grow))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_is_refused(tmp_path, value):
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(InvalidModel, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*NaN or infinity|"
                                           r"NaN or infinity.*q_proj") as err:
        _load(tampered_copy(arch_model("llama"), tmp_path / "m", with_value(name, value)))
    assert err.value.details["reason"] == "non_finite" and err.value.details["tensors"] == [name]


def test_pickled_weights_get_the_same_proof(minilm_dir, tmp_path):
    """The weights-only pickle path (ONNX encoders): an extra and a missing tensor both refused."""
    import torch
    from safetensors.torch import load_file

    from quantyard.engine.onnx.source import describe, load_model

    state = load_file(minilm_dir / "model.safetensors")
    for label, edit in (("extra", lambda s: {**s, "encoder.extra.weight": torch.zeros(2)}),
                        ("missing", lambda s: {k: v for k, v in s.items() if "layer.3.output.dense" not in k})):
        src = tmp_path / label
        src.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(minilm_dir / f, src / f)
        torch.save(edit(dict(state)), src / "pytorch_model.bin")
        with pytest.raises(InvalidModel, match="pytorch_model.bin") as err:
            load_model(describe(src))
        assert ("encoder.extra.weight" if label == "extra" else "layer.3.output.dense") in err.value.message


# ---- GGUF converter: every source tensor written or skipped for a reason ------------------------


def _plan(path: Path):
    from quantyard.engine.gguf.converter import plan_tensors
    from quantyard.engine.hf.source import open_source

    return plan_tensors(open_source(path), "F16")


def test_gguf_plan_accounts_for_every_tensor_of_every_fixture():
    from quantyard.engine.gguf.converter import architecture
    from quantyard.engine.hf.source import open_source

    for family in ARCH_FIXTURES:
        source = open_source(arch_model(family))
        arch = architecture(source)
        written = {p.source_name for p in _plan(arch_model(family)) if p.source_name}
        skipped = {n: arch.skip_reason(n) for n in source.tensors if n not in written}
        assert all(skipped.values()), (family, skipped)  # nothing vanishes without a reason


def test_gguf_refuses_gpt2_tensors_under_a_llama_config(tmp_path):
    with pytest.raises(InvalidModel, match=r"transformer\.h\.0\.attn\.c_attn") as err:
        _plan(llama_config_over_gpt2(tmp_path / "m"))
    assert "model.safetensors" in err.value.message and err.value.details["reason"] == "unused_tensors"


def test_gguf_refuses_a_missing_required_tensor(tmp_path):
    def drop(t):
        del t["model.layers.1.mlp.gate_proj.weight"]
        return t

    with pytest.raises(InvalidModel, match=r"blk\.1\.ffn_gate\.weight") as err:
        _plan(tampered_copy(arch_model("llama"), tmp_path / "m", drop))
    assert err.value.details["reason"] == "missing_tensors"


def test_gguf_refuses_an_untied_model_without_its_head(tmp_path):
    def drop(t):
        del t["lm_head.weight"]
        return t

    with pytest.raises(InvalidModel, match=r"output\.weight"):
        _plan(tampered_copy(arch_model("llama"), tmp_path / "m", drop))
    # the same tensors with tie_word_embeddings true are a legitimate tied model
    tied = tampered_copy(tmp_path / "m", tmp_path / "tied", config=lambda c: {**c, "tie_word_embeddings": True})
    assert "output.weight" not in {p.name for p in _plan(tied)}


def test_gguf_refuses_gpt2_without_its_biases(tmp_path):
    def drop(t):
        del t["transformer.h.0.mlp.c_fc.bias"]
        return t

    with pytest.raises(InvalidModel, match=r"blk\.0\.ffn_up\.bias"):
        _plan(tampered_copy(arch_model("gpt2"), tmp_path / "m", drop))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_gguf_write_refuses_a_non_finite_tensor_and_leaves_no_file(tmp_path, value):
    from quantyard.engine.gguf.converter import write_float_gguf
    from quantyard.engine.hf.source import open_source

    name = "model.layers.1.mlp.down_proj.weight"
    src = tampered_copy(arch_model("llama"), tmp_path / "m", with_value(name, value))
    out = tmp_path / "x.gguf"
    with pytest.raises(InvalidModel, match=rf"model\.safetensors: tensor {name} holds NaN or infinity"):
        write_float_gguf(open_source(src), out, "F16")
    assert not out.exists()


# ---- non-finite validation numbers never pass ------------------------------------------------


def test_non_finite_logit_metrics_fail_validation():
    from quantyard.engine.gguf.quality import check_quality
    from quantyard.engine.gguf.validate import check_metrics, compare_logits

    ref = np.random.default_rng(0).normal(size=(6, 32)).astype(np.float32)
    bad = ref.copy()
    bad[2, 5] = np.nan
    metrics = compare_logits(ref, bad)
    assert np.isnan(metrics["mean_kl"])
    with pytest.raises(ValidationFailed, match="non-finite") as err:
        check_metrics(metrics, "BF16")
    assert json.dumps(err.value.details)  # JSON-safe: names only
    with pytest.raises(ValidationFailed, match="non-finite"):
        check_quality("BF16", metrics)


def test_onnx_compare_refuses_a_non_finite_reference():
    from quantyard.engine.onnx.validate import compare

    ref = np.ones((2, 3, 4), dtype=np.float32)
    ref[0, 1, 2] = np.inf
    with pytest.raises(ValidationFailed, match="PyTorch source"):
        compare(np.ones_like(ref), ref, np.ones((2, 3), dtype=np.int64))


def test_finiteness_check_costs_little_on_smollm2(smollm2_dir):
    """The converter's per-tensor isfinite pass, measured against reading the same tensors
    (what every conversion does anyway): printed, and bounded loosely (shared CI cores)."""
    from quantyard.engine.gguf.converter import _finite
    from quantyard.engine.hf.source import open_source
    from quantyard.engine.hf.tensor_reader import read_f32

    source = open_source(smollm2_dir)
    read = check = 0.0
    for name, ref in source.tensors.items():
        t0 = time.perf_counter()
        data = read_f32(ref)
        t1 = time.perf_counter()
        _finite(data, name, ref.file.name)
        check += time.perf_counter() - t1
        read += t1 - t0
    print(f"\nSmolLM2-135M: read {read:.3f} s, isfinite {check:.3f} s ({check / read:.1%} of reading)")
    assert check < max(1.0, read)
