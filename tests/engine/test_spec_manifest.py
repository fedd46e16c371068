"""Pure parts of the engine: target specs, the manifest, the error taxonomy, the registry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantyard.engine import errors, manifest, registry
from quantyard.engine.spec import TargetSpec, parse_target


@pytest.mark.parametrize("text", ["gguf:Q8_0", "GGUF:q8_0", " gguf : Q8_0 "])
def test_parse_string_is_case_insensitive_and_canonical(text):
    spec = parse_target(text)
    assert (spec.format, spec.quantization, spec.key) == ("gguf", "Q8_0", "gguf:Q8_0")
    assert spec.to_dict() == {"format": "gguf", "quantization": "Q8_0", "params": {}}


def test_parse_mapping_keeps_params_frozen():
    spec = parse_target({"format": "Gguf", "quantization": "bf16", "params": {"k": [1, 2]}})
    assert spec == TargetSpec("gguf", "BF16", {"k": [1, 2]})
    assert spec.to_dict()["params"] == {"k": [1, 2]}
    with pytest.raises(TypeError):
        spec.params["k"] = 3  # type: ignore[index]
    assert hash(spec) == hash(parse_target(spec.to_dict()))
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()


@pytest.mark.parametrize("bad, named", [
    ("tflite:int8", "onnx"),          # unknown format -> names valid formats
    ("onnx:int8", "int8-dynamic"),    # unknown quantization of a known format -> names valid ones
    ("gguf:Q3_X", "Q8_0"),            # unknown quantization -> names valid ones
    ("gguf", "format:QUANTIZATION"),  # no separator
    ({"format": "gguf"}, "quantization"),
    (42, "string"),
])
def test_parse_rejects_with_helpful_message(bad, named):
    with pytest.raises(errors.UnsupportedTarget) as exc:
        parse_target(bad)
    assert named in str(exc.value)
    assert exc.value.code == "unsupported_target" and exc.value.retryable is False


def test_error_taxonomy():
    assert issubclass(errors.ValidationFailed, errors.ConversionError)
    assert errors.ResourceExhausted("x").retryable is True
    e = errors.InvalidModel("bad", details={"file": "a"})
    assert e.to_dict() == {"code": "invalid_model", "message": "bad", "details": {"file": "a"}}
    codes = {c.code for c in (errors.InvalidModel, errors.UnsupportedArchitecture, errors.UnsupportedTarget,
                              errors.ValidationFailed, errors.Cancelled, errors.ResourceExhausted)}
    assert len(codes) == 6


def test_capabilities_is_json_and_a_copy():
    caps = manifest.capabilities()
    assert caps["engine_version"] == manifest.ENGINE_VERSION
    gguf = caps["formats"]["gguf"]
    assert gguf["quantizations"][:4] == ["F32", "F16", "BF16", "Q8_0"] and "Q4_K_M" in gguf["quantizations"]
    assert gguf["architectures"][0] == "LlamaForCausalLM" and "GPT2LMHeadModel" in gguf["architectures"]
    assert caps["hardware_classes"] == ["cpu", "cuda"]
    caps["formats"]["gguf"]["quantizations"].append("X")
    assert "X" not in manifest.MANIFEST["formats"]["gguf"]["quantizations"]
    json.dumps(caps)


def test_pure_modules_import_nothing_heavy():
    code = (
        "import sys\n"
        "import quantyard.engine, quantyard.engine.manifest, quantyard.engine.spec, quantyard.engine.errors\n"
        "quantyard.engine.capabilities(); quantyard.engine.parse_target('gguf:F16')\n"
        "heavy = [m for m in ('torch', 'numpy', 'gguf', 'llama_cpp', 'transformers', 'safetensors') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_registry_rejects_duplicate_format():
    assert "gguf" in registry.registered_formats()
    with pytest.raises(ValueError, match="already registered"):
        registry.register_converter("gguf", lambda: None)


def test_registry_unknown_format():
    with pytest.raises(errors.UnsupportedTarget, match="gguf"):
        registry.get_converter("tflite")
