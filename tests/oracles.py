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


# ---------------------------------------------------------------------------------------------
# llama-perplexity (llama.cpp's own quality numbers: PPL and KL divergence against a base file)

PERPLEXITY_WAIT_S = 45 * 60


def llama_perplexity_tool() -> Path:
    """llama-perplexity built by scripts/build-llama-tools.sh; waits for a build in progress,
    builds in CI, skips loudly otherwise (tests/engine/_llama_tools.py's policy)."""
    import time

    import pytest

    from tests.engine import _llama_tools as lt

    tool = lt.PREFIX / "bin" / "llama-perplexity"
    deadline = time.monotonic() + PERPLEXITY_WAIT_S
    while not tool.is_file() and lt._build_running() and time.monotonic() < deadline:
        time.sleep(10)
    if not tool.is_file() and lt._required():
        import subprocess

        r = subprocess.run(["bash", str(lt.REPO / "scripts" / "build-llama-tools.sh")], capture_output=True, text=True)
        if r.returncode != 0 or not tool.is_file():
            pytest.fail(f"scripts/build-llama-tools.sh failed:\n{r.stderr[-3000:]}", pytrace=False)
    if not tool.is_file():
        pytest.skip(f"!!! SKIPPED, llama-perplexity MISSING: run `bash scripts/build-llama-tools.sh` (builds it into "
                    f"{tool.parent}); with CI or QUANTYARD_REQUIRE_SERVICES=1 this is a failure.")
    return tool


def _number(out: str, label: str) -> float:
    import re

    m = re.search(re.escape(label) + r"\s*:\s*(-?[0-9.]+(?:e-?[0-9]+)?)", out)
    assert m, f"llama-perplexity printed no {label!r}:\n{out[-3000:]}"
    return float(m.group(1))


def llama_perplexity_kld(tool: Path, base_gguf: Path, gguf: Path, text_file: Path, *, n_ctx: int, chunks: int,
                         work: Path, threads: int = 2) -> dict[str, float]:
    """`llama-perplexity -m BASE --kl-divergence-base` then `-m GGUF --kl-divergence` on the same
    text and chunking; llama.cpp's final statistics, fractions as fractions (not %). The KV cache
    is F32, flash attention off, no repacked weights and one chunk per batch, as Quantyard evaluates."""
    import subprocess

    common = ["-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(chunks),
              "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--no-repack", "-t", str(threads)]
    base = Path(work) / f"{Path(base_gguf).stem}-{n_ctx}x{chunks}.kld"
    if not base.is_file():
        r = subprocess.run([str(tool), "-m", str(base_gguf), "--kl-divergence-base", str(base), *common],
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0 and base.is_file(), f"llama-perplexity (base) failed:\n{r.stderr[-3000:]}"
    for _ in range(KLD_ATTEMPTS):
        r = subprocess.run([str(tool), "-m", str(gguf), "--kl-divergence-base", str(base), "--kl-divergence", *common],
                           capture_output=True, text=True, timeout=1800)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"llama-perplexity (KL) failed:\n{out[-3000:]}"
        if kld_output_complete(out):
            break
    return parse_llama_kld(out)


# llama.cpp's asynchronous logger can lose its last lines when the process exits (a known race,
# ggml-org/llama.cpp#22142): on a short run the final statistics are sometimes missing from the
# output. The computation is deterministic, so the run is repeated until they are printed.
KLD_ATTEMPTS = 25  # a lost tail was seen in 55-80% of 0.1 s runs here, rarely on longer ones


def kld_output_complete(out: str) -> bool:
    """Did llama-perplexity --kl-divergence print its final statistics?"""
    return "Mean PPL(Q)" in out and "Same top p" in out.split("Mean PPL(Q)", 1)[1]


def parse_llama_kld(out: str) -> dict[str, float]:
    """llama-perplexity --kl-divergence's final statistics from its output, fractions as fractions."""
    return {"ppl": _number(out, "Mean PPL(Q)"), "ppl_base": _number(out, "Mean PPL(base)"),
            "ln_ppl_ratio": _number(out, "Mean ln(PPL(Q)/PPL(base))"), "mean_kl": _number(out, "Mean    KLD"),
            "kl_max": _number(out, "Maximum KLD"), "kl_p99": _number(out, "99.0%   KLD"),
            "kl_median": _number(out, "Median  KLD"), "top1_agreement": _number(out, "Same top p") / 100,
            "rms_delta_p": _number(out, "RMS Δp    ") / 100, "mean_delta_p": _number(out, "Mean    Δp") / 100}
