"""Refusals: pickles that would run code, unsupported architectures, bad params; a light import."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantyard.engine.errors import InvalidModel, UnsupportedArchitecture, UnsupportedTarget
from quantyard.engine.onnx import ONNX_MANIFEST, convert_onnx, preflight_onnx
from quantyard.engine.spec import TargetSpec


class _Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _folder_without_weights(minilm_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, dst / name)
    return dst


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(minilm_dir, tmp_path, writer):
    import torch

    src = _folder_without_weights(minilm_dir, tmp_path / "evil")
    marker = tmp_path / "pwned"
    payload = {"embeddings.word_embeddings.weight": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, src / "pytorch_model.bin")
    else:
        (src / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    with pytest.raises(InvalidModel) as err:
        convert_onnx(src, TargetSpec("onnx", "fp32"), tmp_path / "out")
    assert not marker.exists(), "the pickle's payload ran"
    assert "pickle" in err.value.message and "pytorch_model.bin" in err.value.message
    assert err.value.details["reason"] == "unsafe_pickle"


def test_plain_tensor_pickle_loads_weights_only(minilm_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from quantyard.engine.onnx.source import describe, load_model

    src = _folder_without_weights(minilm_dir, tmp_path / "bin")
    torch.save(load_file(minilm_dir / "model.safetensors"), src / "pytorch_model.bin")
    model = load_model(describe(src))
    ref = load_file(minilm_dir / "model.safetensors")["embeddings.word_embeddings.weight"]
    assert torch.equal(model.embeddings.word_embeddings.weight, ref)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    with pytest.raises(UnsupportedArchitecture) as err:
        preflight_onnx(tmp_path, [TargetSpec("onnx", "fp32")])
    assert "MambaForCausalLM" in err.value.message
    assert all(a in err.value.message for a in ONNX_MANIFEST["architectures"])


@pytest.mark.parametrize("params, word", [
    ({"block_size": 48}, "block_size"), ({"weight_type": "QInt4"}, "weight_type"), ({"opset": 9}, "opset"),
    ({"calibration": {"method": "KL"}}, "method"), ({"tolerances": {"rtol": 1}}, "tolerances"),
    ({"calibration_texts": []}, "calibration_texts"),
])
def test_bad_params_are_refused_at_preflight(minilm_dir, params, word):
    with pytest.raises(UnsupportedTarget, match=word):
        preflight_onnx(minilm_dir, [TargetSpec("onnx", "int8-static", params)])


def test_preflight_reads_headers_only(minilm_dir):
    report = preflight_onnx(minilm_dir, [TargetSpec("onnx", q) for q in ONNX_MANIFEST["quantizations"]])
    assert report.architecture == "BertModel" and report.source_dtype == "F32"
    assert 22_000_000 < report.parameter_count < 23_500_000
    sizes = {k: v["size_bytes"] for k, v in report.estimates.items()}
    assert sizes["onnx:fp32"] > sizes["onnx:fp16"] > sizes["onnx:int8-dynamic"]
    assert 85e6 < sizes["onnx:fp32"] < 95e6 and 20e6 < sizes["onnx:int8-dynamic"] < 26e6


def test_package_import_is_light():
    code = ("import sys, quantyard.engine.onnx as o; o.ONNX_MANIFEST; "
            "print(sorted(m for m in ('torch','onnx','onnxruntime','numpy','transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "[]"
