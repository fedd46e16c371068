"""Decoder LLMs (Llama, GPT-2, ...) -> ONNX fp32 with past key/values, so generation runs in
onnxruntime one token at a time.

The graph's signature (Optimum's names, so its consumers can read ours):

    inputs   input_ids        int64 (batch, sequence)
             attention_mask   int64 (batch, past_sequence + sequence)
             position_ids     int64 (batch, sequence)
             past_key_values.{i}.key / .value   float (batch, kv_heads, past_sequence, head_dim)
    outputs  logits           float (batch, sequence, vocab)
             present.{i}.key / .value           float (batch, kv_heads, past_sequence + sequence, head_dim)

The first step feeds past tensors of length 0. Inside the exported module the flat past tensors
become the cache object transformers 5 expects (DynamicCache), and the updated cache is
flattened back into the present outputs.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError, InvalidModel
from .modelio import consolidate, data_path

BASE_INPUTS = ("input_ids", "attention_mask", "position_ids")


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config (Llama-style or GPT-2-style names)."""
    def get(*names):
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    layers = get("num_hidden_layers", "n_layer")
    heads = get("num_attention_heads", "n_head")
    kv_heads = get("num_key_value_heads") or heads
    hidden = get("hidden_size", "n_embd")
    head_dim = get("head_dim") or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        raise InvalidModel(f"cannot read layers / kv heads / head dim from {type(config).__name__}")
    return int(layers), int(kv_heads), int(head_dim)


def past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def position_ids_from_mask(attention_mask, sequence: int):
    """Positions of the last `sequence` tokens as transformers' generate computes them
    (cumulative sum of the mask minus one; padded slots get 1). numpy or torch in, same out."""
    pos = attention_mask.cumsum(-1) - 1
    pos = pos * (attention_mask != 0) + (attention_mask == 0) * 1
    return pos[:, -sequence:]


def _cache_keyword(model) -> str:
    """transformers 5.2x renamed forward's `past_key_values` to `cache` (the old name still works,
    with a deprecation warning); use whichever this version's forward declares."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _wrapper(model, n_layers: int):
    import torch
    from transformers import DynamicCache

    cache_kw = _cache_keyword(model)

    class DecoderWithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past_key_values):
            pairs = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(n_layers)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, return_dict=True, **{cache_kw: cache})
            present = []
            for layer in _returned_cache(out).layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return DecoderWithPast().eval()


def example_inputs(model, *, batch: int = 2, sequence: int = 3, past: int = 4, seed: int = 0) -> dict:
    """Random example feeds (torch) with a non-empty past, left padding in the first row."""
    import torch

    n_layers, kv_heads, head_dim = cache_shape(model.config)
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    dtype = next(model.parameters()).dtype
    mask = torch.ones(batch, past + sequence, dtype=torch.int64)
    mask[0, :1] = 0
    return {
        "input_ids": torch.randint(0, vocab, (batch, sequence), generator=gen),
        "attention_mask": mask,
        "position_ids": position_ids_from_mask(mask, sequence),
        "past_key_values": [torch.randn(batch, kv_heads, past, head_dim, generator=gen).to(dtype)
                            for _ in range(2 * n_layers)],
    }


def _dynamic_shapes(n_layers: int):
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past = torch.export.Dim("past_sequence")
    total = torch.export.Dim.AUTO  # past + sequence: a derived size the exporter works out itself
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq},
            "past_key_values": [{0: batch, 2: past} for _ in range(2 * n_layers)]}


def _check(path: Path, model, kwargs) -> tuple[float, float]:
    """(max abs diff, max diff relative to the output's scale) of the written graph's logits and
    presents vs the model on the example feeds,
    on a first step with an empty past (length 0, which the example never showed the exporter),
    and on other batch / sequence / past sizes (a traced graph that baked in shapes fails here)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = _wrapper(model, cache_shape(model.config)[0])
    worst, relative = 0.0, 0.0
    empty = dict(kwargs, past_key_values=[p[:, :, :0] for p in kwargs["past_key_values"]],
                 attention_mask=kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:])
    empty["position_ids"] = position_ids_from_mask(empty["attention_mask"], kwargs["input_ids"].shape[1])
    other = example_inputs(model, batch=3, sequence=5, past=2, seed=1)  # shapes the export never saw
    for feeds in (kwargs, empty, other):
        with torch.no_grad():
            ref = wrapper(**feeds)
        flat = {n: feeds[n].numpy() for n in BASE_INPUTS}
        flat.update({n: t.numpy() for n, t in zip(past_names(len(feeds["past_key_values"]) // 2),
                                                  feeds["past_key_values"], strict=False)})
        outs = sess.run(None, flat)
        for o, r in zip(outs, ref, strict=False):
            if o.shape != tuple(r.shape):
                return float("inf"), float("inf")
            diff = float(np.abs(o - r.float().numpy()).max())
            # a real model's logits reach tens: scale the check so float rounding over its depth
            # passes while a broken graph (diffs of whole units, or of the same size as the
            # outputs) does not
            worst = max(worst, diff)
            relative = max(relative, diff / max(1.0, float(r.abs().max())))
    return worst, relative


def _name_total_axis(path: Path) -> None:
    """The exporter names the mask's past+sequence axis after a symbol ("s53"); give it the name
    the present outputs' axis has in words."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for vi in model.graph.input:
        if vi.name == "attention_mask":
            dim = vi.type.tensor_type.shape.dim[1]
            if dim.HasField("dim_param"):
                dim.dim_param = "past_sequence + sequence"
    onnx.save(model, str(path))


def export_decoder(model, path: Path, *, opset: int = 18, tolerance: float = 1e-3,
                   allow_legacy: bool = True) -> dict:
    """Write `model` (a *ForCausalLM / *LMHeadModel) as ONNX with past key/values at `path`.

    The dynamo exporter is tried first; the legacy TorchScript exporter only when dynamo fails
    and `allow_legacy`, and its graph is kept only if it matches the model (within `tolerance` of
    the outputs' scale, i.e. max |diff| / max(1, max |output|))
    both with a past and with an empty one. Returns what the export decided."""
    import torch

    model = model.eval()
    n_layers = cache_shape(model.config)[0]
    kwargs = example_inputs(model)
    inputs, outputs = [*BASE_INPUTS, *past_names(n_layers)], ["logits", *present_names(n_layers)]
    wrapper = _wrapper(model, n_layers)
    path = Path(path)
    errors = []
    try:
        with torch.no_grad():
            program = torch.onnx.export(wrapper, (), kwargs=kwargs, dynamo=True, opset_version=opset,
                                        input_names=inputs, output_names=outputs,
                                        dynamic_shapes=_dynamic_shapes(n_layers), external_data=True,
                                        optimize=True, verbose=False)
        if program is None:
            raise InvalidModel("torch.onnx.export produced no program")
        data_path(path).unlink(missing_ok=True)
        program.save(str(path), external_data=True)
        consolidate(path)
        _name_total_axis(path)
        exporter = f"torch.onnx dynamo (torch {torch.__version__})"
        diff, relative = _check(path, model, kwargs)
        if not relative <= tolerance:  # NaN too
            errors.append(f"dynamo graph drifts: max abs diff {diff:.3g} ({relative:.3g} of the output scale)")
    except Exception as e:  # noqa: BLE001 -- any exporter error: recorded, legacy tried, then raised
        errors.append(f"dynamo: {type(e).__name__}: {str(e)[:400]}")
    if errors and allow_legacy:
        try:
            _export_legacy(wrapper, kwargs, path, inputs, outputs, n_layers, opset)
            exporter = f"torch.onnx legacy TorchScript (torch {torch.__version__})"
            diff, relative = _check(path, model, kwargs)
            if not relative <= tolerance:  # NaN too
                errors.append(f"legacy graph drifts: max abs diff {diff:.3g} ({relative:.3g} of the output scale)")
            else:
                errors = []
        except Exception as e:  # noqa: BLE001 -- recorded and raised below with dynamo's
            errors.append(f"legacy: {type(e).__name__}: {str(e)[:400]}")
    if errors:
        path.unlink(missing_ok=True)
        data_path(path).unlink(missing_ok=True)
        raise ConversionError("decoder export failed: " + "; ".join(errors))
    return {"inputs": inputs, "outputs": outputs, "opset": opset, "exporter": exporter,
            "layers": n_layers, "check_max_abs_diff": diff, "check_relative_diff": relative}


def _export_legacy(wrapper, kwargs, path, inputs, outputs, n_layers, opset) -> None:
    import torch

    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past_names(n_layers)})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in present_names(n_layers)})
    args = (kwargs["input_ids"], kwargs["attention_mask"], kwargs["position_ids"], kwargs["past_key_values"])
    data_path(path).unlink(missing_ok=True)
    with torch.no_grad():
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes)


def load_causal_lm(root: Path, dtype: str = "float32"):
    """The *ForCausalLM model and tokenizer of a Hugging Face folder, in float32, eager attention
    (the exporter traces it; sdpa's fast paths branch on shapes); proven to be the folder's
    weights (engine/hf/strict_load.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hf.strict_load import load_pretrained

    model = load_pretrained(AutoModelForCausalLM, root, dtype=dtype, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(root)


__all__ = [
    "BASE_INPUTS",
    "cache_shape",
    "example_inputs",
    "export_decoder",
    "load_causal_lm",
    "past_names",
    "position_ids_from_mask",
    "present_names",
]
