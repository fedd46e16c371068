"""Greedy generation in onnxruntime over a decoder exported by decoder.export_decoder.

The same loop transformers' `generate(do_sample=False)` runs: one prefill step over the prompt
with an empty past, then one token per step with the present key/values fed back as the past.
Positions come from the attention mask (left padding works); a row that has produced the end
token is filled with the pad token from then on, as transformers does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .decoder import position_ids_from_mask

if TYPE_CHECKING:  # numpy is imported where it is used
    import numpy as np


@dataclass
class Generation:
    sequences: np.ndarray  # int64 (batch, prompt + generated): prompt included, as transformers returns
    first_logits: np.ndarray | None  # float (batch, vocab): the prefill step's last-position logits
    steps: int = 0
    step_logits: list = field(default_factory=list)  # each step's (batch, vocab) logits, when kept


class OnnxDecoder:
    """An onnxruntime session over a decoder-with-past graph, with its cache layout read from it."""

    def __init__(self, path: Path, *, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=list(providers))
        ins = self.session.get_inputs()
        self.past = [i for i in ins if i.name.startswith("past_key_values.")]
        self.presents = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.input_names = {i.name for i in ins}
        if not self.past or len(self.past) != len(self.presents):
            raise ValueError(f"{Path(path).name} has no past/present key-value inputs and outputs")
        self.float_type = {"tensor(float)": "float32", "tensor(float16)": "float16"}.get(self.past[0].type, "float32")

    def empty_past(self, batch: int) -> dict:
        import numpy as np

        feeds = {}
        for i in self.past:
            _, heads, _, head_dim = i.shape
            feeds[i.name] = np.zeros((batch, int(heads), 0, int(head_dim)), dtype=self.float_type)
        return feeds

    def step(self, input_ids, attention_mask, past: dict):
        """(logits (batch, sequence, vocab), next past) for one forward step."""
        import numpy as np

        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64), **past}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = position_ids_from_mask(feeds["attention_mask"], input_ids.shape[1]).astype(np.int64)
        outs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        by_name = dict(zip(names, outs, strict=False))
        nxt = {p.name: by_name[p.name.replace("past_key_values.", "present.")] for p in self.past}
        return by_name["logits"], nxt


def greedy_generate(decoder: OnnxDecoder | Path, input_ids, attention_mask=None, *, max_new_tokens: int = 20,
                    eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                    keep_logits: bool = False) -> Generation:
    """Greedy decoding of `max_new_tokens` tokens (fewer if every row has ended)."""
    import numpy as np

    if not isinstance(decoder, OnnxDecoder):
        decoder = OnnxDecoder(decoder)
    input_ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    if pad_token_id is None and eos:
        pad_token_id = min(eos)
    batch = input_ids.shape[0]
    sequences, past, step_in = input_ids, decoder.empty_past(batch), input_ids
    done = np.zeros(batch, dtype=bool)
    result = Generation(sequences=input_ids, first_logits=None)  # sequences: set after the loop
    for _ in range(max_new_tokens):
        logits, past = decoder.step(step_in, mask, past)
        last = logits[:, -1, :]
        if result.first_logits is None:
            result.first_logits = last
        if keep_logits:
            result.step_logits.append(last)
        token = last.argmax(-1).astype(np.int64)
        if eos:
            token = np.where(done, pad_token_id, token)
            done |= np.isin(token, list(eos))
        sequences = np.concatenate([sequences, token[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        step_in = token[:, None]
        result.steps += 1
        if eos and done.all():
            break
    result.sequences = sequences
    return result


__all__ = ["Generation", "OnnxDecoder", "greedy_generate"]
