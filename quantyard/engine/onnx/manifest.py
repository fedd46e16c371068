"""What the ONNX engine offers: the "onnx" entry of the engine's manifest, plus the export task
of each architecture (stdlib only, like engine/manifest.py)."""

from __future__ import annotations

from ..manifest import MANIFEST

ONNX_MANIFEST: dict = MANIFEST["formats"]["onnx"]
QUANTIZATIONS = tuple(ONNX_MANIFEST["quantizations"])

# config.json `architectures[0]` -> export task. A head that is handled but not yet tested
# (sequence classification) stays out of the manifest, so jobs can't ask for it.
TASKS = {
    "BertModel": "feature-extraction",
    "BertForSequenceClassification": "sequence-classification",
}
SUPPORTED = [a for a in TASKS if a in ONNX_MANIFEST["architectures"]]

__all__ = ["ONNX_MANIFEST", "QUANTIZATIONS", "TASKS", "SUPPORTED"]
