"""A decoder ONNX against its PyTorch source, in numbers: prefill logits and greedy generation.

Both runtimes see the same left-padded batch of fixed prompts:
  (a) the prefill step's logits (empty past): max abs diff over every real position, cosine of
      the mean-centred last-position rows (the distribution the first new token is drawn from);
  (b) greedy generation of `new_tokens` tokens, our onnxruntime loop (generate.py) against
      transformers' own `generate(do_sample=False)`; agreement is, per prompt, the tokens equal
      before the first difference over the tokens generated, averaged over prompts.
A check outside tolerance raises ValidationFailed carrying every measured number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ValidationFailed

if TYPE_CHECKING:  # numpy is imported where it is used
    import numpy as np


@dataclass(frozen=True)
class Reference:
    """transformers' answers on the prompts, computed once per conversion."""

    input_ids: np.ndarray  # int64 (batch, prompt)
    attention_mask: np.ndarray  # int64 (batch, prompt), left padding
    logits: np.ndarray  # float32 (batch, prompt, vocab): the prefill step
    sequences: np.ndarray  # int64 (batch, prompt + generated)
    eos_token_id: int | Sequence[int] | None
    pad_token_id: int
    new_tokens: int


def prepare_tokenizer(tokenizer):
    """Left padding (generation appends on the right), a pad token where the model has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _eos(model):
    eos = getattr(model.generation_config, "eos_token_id", None)
    return model.config.eos_token_id if eos is None else eos


def torch_reference(model, tokenizer, prompts: Sequence[str], new_tokens: int) -> Reference:
    import torch
    from transformers import GenerationConfig

    from .decoder import position_ids_from_mask

    tokenizer = prepare_tokenizer(tokenizer)
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    eos = _eos(model)
    pad = tokenizer.pad_token_id
    # a fresh config: the model's may ask for sampling, repetition penalties or a min length,
    # which our greedy loop (and any plain ONNX consumer) does not apply
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, eos_token_id=eos,
                              pad_token_id=pad)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask, ids.shape[1]),
                       use_cache=False).logits
        sequences = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return Reference(ids.numpy(), mask.numpy(), logits.float().numpy(), sequences.numpy(), eos, int(pad), new_tokens)


def _row_cosine(a, b):
    import numpy as np

    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def compare_prefill(out, ref: Reference) -> dict:
    import numpy as np

    if out.shape != ref.logits.shape:
        raise ValidationFailed(f"prefill logits shape {out.shape} differs from the source's {ref.logits.shape}",
                               details={"shape": list(out.shape), "expected": list(ref.logits.shape)})
    if not np.isfinite(out).all():
        raise ValidationFailed("the ONNX logits hold NaN or infinity", details={"finite": False})
    if not np.isfinite(ref.logits).all():  # a reference that is not a number validates nothing
        raise ValidationFailed("the PyTorch source's logits hold NaN or infinity", details={"finite": False})
    real = ref.attention_mask.astype(bool)
    # centred: softmax ignores a constant shift of a row, and that shared offset would otherwise
    # dominate the cosine (measured on SmolLM2 int4: raw 0.23 with every top-1 token right)
    last_out, last_ref = out[:, -1, :], ref.logits[:, -1, :]
    cos = _row_cosine(last_out - last_out.mean(-1, keepdims=True), last_ref - last_ref.mean(-1, keepdims=True))
    return {"max_abs_diff": float(np.abs(out[real] - ref.logits[real]).max()), "cosine_min": float(cos.min()),
            "cosine_of": "mean-centred last-position logits of the prefill step",
            "top1_prefill_agreement": float((out[:, -1].argmax(-1) == ref.logits[:, -1].argmax(-1)).mean())}


def agreement(got, want, prompt_length: int) -> list[float]:
    """Per row: generated tokens equal before the first difference / tokens generated."""
    rows = []
    a, b = got[:, prompt_length:], want[:, prompt_length:]
    total = max(a.shape[1], b.shape[1], 1)
    n = min(a.shape[1], b.shape[1])
    for x, y in zip(a[:, :n], b[:, :n], strict=False):
        diff = (x != y).nonzero()[0]
        rows.append((int(diff[0]) if diff.size else n) / total)
    return rows


def compare_generation(sequences, ref: Reference) -> dict:
    per_prompt = agreement(sequences, ref.sequences, ref.input_ids.shape[1])
    return {"generation_token_agreement": float(sum(per_prompt) / len(per_prompt)),
            "generation_agreement_per_prompt": per_prompt,
            "generation_identical": all(r == 1.0 for r in per_prompt) and sequences.shape == ref.sequences.shape,
            "generation_new_tokens": ref.new_tokens, "generation_prompts": len(per_prompt)}


def validate_decoder(path: Path, ref: Reference, tolerances: dict[str, float]) -> dict:
    """Run the artifact on the reference's prompts; ValidationFailed when out of tolerance."""
    from .generate import OnnxDecoder, greedy_generate

    try:
        decoder = OnnxDecoder(path)
        logits, _ = decoder.step(ref.input_ids, ref.attention_mask, decoder.empty_past(ref.input_ids.shape[0]))
        gen = greedy_generate(decoder, ref.input_ids, ref.attention_mask, max_new_tokens=ref.new_tokens,
                              eos_token_id=ref.eos_token_id, pad_token_id=ref.pad_token_id)
    except Exception as e:  # onnxruntime raises its own exception types; all mean "doesn't run"
        raise ValidationFailed(f"onnxruntime cannot run {Path(path).name}: {str(e)[:400]}") from e
    from ..gguf.quality import require_finite

    numbers = compare_prefill(logits.astype("float32"), ref)
    numbers.update(compare_generation(gen.sequences, ref))
    require_finite(numbers, Path(path).name)  # NaN compares False with every tolerance
    numbers.update({f"tolerance_{k}": v for k, v in tolerances.items()}, samples=int(ref.input_ids.shape[0]))
    failures = []
    if not numbers["max_abs_diff"] <= tolerances["max_abs_diff"]:
        failures.append(f"prefill logits max abs diff {numbers['max_abs_diff']:.6g} > tolerance "
                        f"{tolerances['max_abs_diff']:.6g}")
    if not numbers["cosine_min"] >= tolerances["min_cosine"]:
        failures.append(f"cosine of last-position logits {numbers['cosine_min']:.6f} < tolerance "
                        f"{tolerances['min_cosine']:.6f}")
    if numbers["generation_token_agreement"] < tolerances["min_token_agreement"]:
        failures.append(f"greedy generation agrees with transformers on {numbers['generation_token_agreement']:.3f} "
                        f"of {ref.new_tokens} tokens per prompt (per prompt {numbers['generation_agreement_per_prompt']})"
                        f" < minimum {tolerances['min_token_agreement']:.3f}")
    if failures:
        numbers["generated_tokens"] = gen.sequences[:, ref.input_ids.shape[1]:].tolist()
        numbers["expected_tokens"] = ref.sequences[:, ref.input_ids.shape[1]:].tolist()
        raise ValidationFailed(f"{Path(path).name} does not match its PyTorch source: " + "; ".join(failures),
                               details=numbers)
    return numbers


__all__ = [
    "Reference",
    "agreement",
    "compare_generation",
    "compare_prefill",
    "prepare_tokenizer",
    "torch_reference",
    "validate_decoder",
]
