"""Independent oracles for checking artifacts: llama.cpp runs the GGUF, transformers the source.

Used by end-to-end tests; nothing here calls Quantyard's own validation code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT = "The quick brown fox jumps over the lazy dog. Quantyard converts 1234 models!"


@dataclass
class LogitComparison:
    hf_ids: list[int]
    llama_ids: list[int]
    top1_agreement: float
    max_abs_diff: float
    mean_kl: float


def hf_logits(model_dir: Path, text: str = PROMPT) -> tuple[list[int], np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    return list(ids), logits


def llama_cpp_logits(gguf_path: Path, text: str = PROMPT) -> tuple[list[int], np.ndarray]:
    from quantyard.engine.gguf.llama_runtime import open_llama

    llm = open_llama(model_path=str(gguf_path), n_ctx=256, logits_all=True, verbose=False,
                n_threads=2, seed=0)
    try:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()
    return list(ids), logits


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(model_dir: Path, gguf_path: Path, text: str = PROMPT) -> LogitComparison:
    hf_ids, hf = hf_logits(model_dir, text)
    ll_ids, ll = llama_cpp_logits(gguf_path, text)
    n = min(len(hf), len(ll))
    hf, ll = hf[:n].astype(np.float64), ll[:n]
    p_log, q_log = _log_softmax(hf), _log_softmax(ll)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(axis=-1)
    return LogitComparison(
        hf_ids=hf_ids,
        llama_ids=ll_ids,
        top1_agreement=float((hf.argmax(-1) == ll.argmax(-1)).mean()),
        max_abs_diff=float(np.abs(hf - ll).max()),
        mean_kl=float(kl.mean()),
    )
