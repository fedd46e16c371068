"""What the engine can do, as plain data (stdlib only: the API answers /v1/capabilities from it
without importing torch, numpy or gguf).

Only list what is implemented and tested: the API rejects jobs against this manifest.
"""

from __future__ import annotations

import copy

ENGINE_VERSION = "quantyard-engine/0.1.0"

MANIFEST: dict = {
    "formats": {
        "gguf": {
            # each one byte-identical to llama.cpp's quantizer (tests/engine/test_quantize.py);
            # the IQ3_M..IQ2_XXS group needs an importance matrix
            "quantizations": [
                "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
                "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS",
                "IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_XS", "IQ2_XXS",
            ],
            "architectures": [
                "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel",
            ],
            "source_formats": ["safetensors"],
        },
        "onnx": {
            "quantizations": ["fp32", "fp16", "int8-dynamic", "int8-static", "int4"],
            # config.json architectures[0]; only what tests/engine/onnx exercises
            "architectures": ["BertModel", "BertForSequenceClassification", "RobertaModel",
                              "RobertaForSequenceClassification", "DistilBertModel",
                              "DistilBertForSequenceClassification", "XLMRobertaModel", "LlamaForCausalLM",
                              "GPT2LMHeadModel", "Qwen2ForCausalLM"],
            "source_formats": ["safetensors", "pytorch-weights-only", "torch.export (.pt2)", "torchscript", "onnx"],
        },
    },
    "hardware_classes": ["cpu", "cuda"],
}


def capabilities() -> dict:
    """A JSON-able deep copy of MANIFEST plus the engine version (callers may mutate it)."""
    caps = copy.deepcopy(MANIFEST)
    caps["engine_version"] = ENGINE_VERSION
    return caps


def supported_architectures(fmt: str) -> list[str]:
    """Architectures (config.json `architectures[0]`) the given format accepts."""
    return list(MANIFEST["formats"][fmt]["architectures"])


__all__ = ["ENGINE_VERSION", "MANIFEST", "capabilities", "supported_architectures"]
