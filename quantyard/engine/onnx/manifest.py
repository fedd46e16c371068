"""What the ONNX engine offers: the "onnx" entry of the engine's manifest, plus the export task
of each architecture (stdlib only, like engine/manifest.py)."""

from __future__ import annotations

from ..manifest import MANIFEST

ONNX_MANIFEST: dict = MANIFEST["formats"]["onnx"]
QUANTIZATIONS = tuple(ONNX_MANIFEST["quantizations"])

# config.json `architectures[0]` -> export task. Only what is also in the engine manifest's
# "onnx" architectures (i.e. tested) is offered to jobs.
TASKS = {
    "BertModel": "feature-extraction",
    "BertForSequenceClassification": "sequence-classification",
    "RobertaModel": "feature-extraction",
    "RobertaForSequenceClassification": "sequence-classification",
    "DistilBertModel": "feature-extraction",
    "DistilBertForSequenceClassification": "sequence-classification",
    "XLMRobertaModel": "feature-extraction",
    # decoders with past key/values (decoder_convert.py)
    "LlamaForCausalLM": "text-generation",
    "GPT2LMHeadModel": "text-generation",
    "Qwen2ForCausalLM": "text-generation",
}
SUPPORTED = [a for a in TASKS if a in ONNX_MANIFEST["architectures"]]

__all__ = ["ONNX_MANIFEST", "QUANTIZATIONS", "TASKS", "SUPPORTED"]
