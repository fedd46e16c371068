"""onnxruntime's transformer optimizer: BERT fusions (layer norm, GELU, attention) plus
onnxruntime's basic graph optimizations (constant folding, redundant node removal)."""

from __future__ import annotations

from pathlib import Path

from .modelio import is_large, save_model
from .source import encoder_dims

# config.json model_type -> the optimizer's model family. Others are left as exported.
# onnxruntime's "bert" fusions cover the whole BERT family (its docs list RoBERTa and DistilBERT
# under "bert"); tests/engine/onnx/test_encoders.py checks each of these fuses something.
OPTIMIZER_TYPES = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert"}


def optimize(path_in: Path, path_out: Path, config: dict) -> dict:
    """Fused copy of `path_in` at `path_out`; returns the fused operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = OPTIMIZER_TYPES.get(str(config.get("model_type")))
    if model_type is None:
        import onnx

        # re-saved rather than copied: an external-data file is named inside the .onnx
        save_model(onnx.load(str(path_in)), path_out)
        return {}
    # opt_level=1: hardware-independent rewrites only, so the file runs the same on any worker
    dims = encoder_dims(config)
    optimized = optimize_model(str(path_in), model_type=model_type, num_heads=dims["num_attention_heads"],
                               hidden_size=dims["hidden_size"], opt_level=1, use_gpu=False)
    optimized.save_model_to_file(str(path_out), use_external_data_format=is_large(path_in))
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}


__all__ = ["optimize"]
