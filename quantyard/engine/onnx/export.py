"""PyTorch encoder -> ONNX fp32 with dynamic batch and sequence axes.

torch.onnx.export's dynamo exporter is used: with torch 2.13 and transformers 5 the legacy
TorchScript exporter traces the attention-mask code for the example's shape and silently drifts
by whole units on other inputs (measured on MiniLM: max diff 5.9), which is exactly the failure
validation exists to catch.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError, InvalidModel
from .modelio import consolidate, data_path

SIGNATURE = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = {"feature-extraction": "last_hidden_state", "sequence-classification": "logits"}


def input_names(model, tokenizer) -> list[str]:
    """The tokenizer's inputs that the model's forward accepts, in the tokenizer's order."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return [n for n in tokenizer.model_input_names if n in accepted]


def _wrapper(model, names: list[str], output: str):
    import torch

    class KeywordWrapper(torch.nn.Module):
        # Positional calls fail on BERT ("multiple values for argument 'use_cache'"); keyword
        # arguments are what the model's forward expects.
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return getattr(self.model(**{n: given[n] for n in names}), output)

    return KeywordWrapper().eval()


def export_fp32(model, tokenizer, task: str, path: Path, *, opset: int, example_texts) -> dict:
    """Write the fp32 ONNX at `path`; return what the export decided (names, opset)."""
    import torch

    names = input_names(model, tokenizer)
    output = OUTPUT_NAMES[task]
    enc = tokenizer(list(example_texts), padding=True, return_tensors="pt")
    if not set(names) <= set(SIGNATURE) or "input_ids" not in names:
        raise InvalidModel(f"model inputs {names} are not the BERT-family inputs {list(SIGNATURE)}")
    names = [n for n in SIGNATURE if n in names]  # the wrapper's positional order
    kwargs = {n: enc[n] for n in names}
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {n: {0: batch, 1: seq} for n in names}
    try:
        program = torch.onnx.export(_wrapper(model, names, output), (), kwargs=kwargs, dynamo=True, opset_version=opset,
                                    input_names=names, output_names=[output], dynamic_shapes=shapes,
                                    external_data=True, optimize=True, verbose=False)
    except Exception as e:  # the exporter raises many types; all mean "this model won't export"
        raise ConversionError(f"torch.onnx.export failed: {type(e).__name__}: {str(e)[:500]}") from e
    if program is None:
        raise InvalidModel("torch.onnx.export produced no program")
    # always written with external data first (the exporter's safe path for any size), then
    # folded into one file when it fits protobuf's limit: one file is easier to ship.
    data_path(path).unlink(missing_ok=True)
    program.save(str(path), external_data=True)
    consolidate(path)
    return {"inputs": names, "output": output, "opset": opset, "exporter": f"torch.onnx dynamo (torch {torch.__version__})"}


__all__ = ["export_fp32", "input_names", "OUTPUT_NAMES"]
