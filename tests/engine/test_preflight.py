"""Preflight and the safetensors header parser: fail early, from headers only, with clear words."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from quantyard.engine import InvalidModel, UnsupportedArchitecture, UnsupportedTarget, parse_target, preflight
from quantyard.engine.hf.safetensors_header import read_safetensors_header

TARGETS = [parse_target("gguf:F32"), parse_target("gguf:Q8_0")]


@pytest.fixture
def model_copy(tiny_llama_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, dst)
    return dst


def test_header_parser_agrees_with_safetensors(tiny_llama_sharded_dir):
    from safetensors import safe_open

    for f in sorted(tiny_llama_sharded_dir.glob("*.safetensors")):
        ours, _ = read_safetensors_header(f)
        with safe_open(f, framework="numpy") as st:
            assert set(ours) == set(st.keys())
            for name in st.keys():
                sl = st.get_slice(name)
                assert ours[name].shape == tuple(sl.get_shape())
                assert ours[name].dtype == sl.get_dtype()


def _rewrite_header(path: Path, mutate) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _first_tensor(h):
    return next(k for k in h if k != "__metadata__")


@pytest.mark.parametrize("corrupt, words", [
    (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**9) + b"{}"), "does not fit"),
    (lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{not json"), "not valid JSON"),
    (lambda p: _rewrite_header(p, lambda h: h[_first_tensor(h)].update(dtype="F17")), "unknown dtype"),
    (lambda p: _rewrite_header(p, lambda h: h[_first_tensor(h)].update(shape=[3, 3])), "needs"),
    (lambda p: _rewrite_header(p, lambda h: h[_first_tensor(h)]["data_offsets"].__setitem__(1, 10**12)), "needs"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "past the end"),
])
def test_corrupt_header_is_invalid_model(model_copy, corrupt, words):
    corrupt(model_copy / "model.safetensors")
    with pytest.raises(InvalidModel) as exc:
        preflight(model_copy, TARGETS)
    assert "model.safetensors" in str(exc.value) and words in str(exc.value)


def test_unsupported_architecture_names_supported(tmp_path):
    from transformers import BertConfig

    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=100,
               architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture) as exc:
        preflight(tmp_path, TARGETS)
    assert "BertForMaskedLM" in str(exc.value) and "LlamaForCausalLM" in str(exc.value)
    assert "GPT2LMHeadModel" in str(exc.value)


@pytest.mark.parametrize("remove, words", [
    (["config.json"], "config.json"),
    (["model.safetensors"], "model.safetensors"),
    (["tokenizer.model", "tokenizer.json"], "tokenizer"),
])
def test_missing_files(model_copy, remove, words):
    for name in remove:
        (model_copy / name).unlink()
    with pytest.raises(InvalidModel, match=words):
        preflight(model_copy, TARGETS)


def test_missing_shard_named_in_index(tiny_llama_sharded_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_llama_sharded_dir, dst)
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(InvalidModel, match=victim.name):
        preflight(dst, TARGETS)


def test_unknown_target_rejected(tiny_llama_dir):
    with pytest.raises(UnsupportedTarget):
        preflight(tiny_llama_dir, ["gguf:Q9_9"])


def test_report_counts_parameters_like_transformers(tiny_llama_dir, tiny_llama_bf16_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    expected = sum(p.numel() for p in model.parameters())
    report = preflight(tiny_llama_dir, TARGETS)
    assert report.architecture == "LlamaForCausalLM"
    assert report.parameter_count == expected
    assert report.source_dtype == "F32"
    assert preflight(tiny_llama_bf16_dir, TARGETS).source_dtype == "BF16"
    est = report.estimates
    assert set(est) == {"gguf:F32", "gguf:Q8_0"}
    # Q8_0 is 8.5 bits per weight on 2-D tensors, 1-D tensors (norms) stay F32; the rest of the
    # file (vocab, metadata) is well under a MiB for this model.
    q8 = sum(p.numel() * (8.5 / 8 if p.ndim == 2 else 4) for p in model.parameters())
    assert q8 <= est["gguf:Q8_0"]["size_bytes"] <= q8 + 2**20
    assert 4 * expected <= est["gguf:F32"]["size_bytes"] <= 4 * expected + 2**20
    assert all(e["peak_memory_bytes"] > 0 for e in est.values())
