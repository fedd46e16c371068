"""gguf:auto's search on real models: the winner fits the size budget and its measured KL is no
worse than that of any preset that fits, each preset made by llama.cpp's own quantizer
(llama_cpp.llama_model_quantize) and measured by evaluate_gguf against the same reference; every
candidate (the winner rewritten) loads in llama.cpp.

Cheap variant: the tiny random Llama (CI, ~40 s on 2 busy cores: nine llama.cpp presets are the oracle).
SmolLM2-135M variant: slow (~10 min on 2 cores).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from quantyard.engine import ValidationFailed, convert, parse_target
from quantyard.engine.evaluation.reference import compute_eval_reference
from quantyard.engine.evaluation.report import evaluate_gguf
from quantyard.engine.gguf.auto_budget import parse_auto_budget
from quantyard.engine.gguf.auto_local import LocalCandidates
from quantyard.engine.gguf.ggml_types import FILE_TYPES
from quantyard.engine.spec import parse_size

PRESETS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]


def _llama_cpp_preset(src: Path, dst: Path, quantization: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quantization].llama_ftype
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def _run(hf_dir: Path, tmp: Path, *, between: tuple[str, str], n_ctx: int, chunks: int, max_candidates: int):
    f16 = convert(hf_dir, parse_target("gguf:F16"), tmp / "f16").path
    ref = compute_eval_reference(hf_dir, n_ctx=n_ctx, max_chunks=chunks)

    def evaluate(p):
        return evaluate_gguf(p, ref, threads=2).to_dict()

    cand = LocalCandidates(f16, tmp / "work", evaluate, nthread=2)
    lo, hi = (cand.size_of(q, ()) for q in between)
    max_size = (lo + hi) // 2  # between two presets: the mixture search has room to work
    params = {"max_size": max_size, "presets": PRESETS, "max_candidates": max_candidates}
    budget = parse_auto_budget(parse_target({"format": "gguf", "quantization": "auto", "params": params}).params,
                               parse_size)
    result = cand.search(budget)
    winner = cand.write_winner(result, tmp / "winner.gguf")
    # the oracle: presets made by llama.cpp itself, measured independently
    fitting = {}
    for q in PRESETS:
        path = _llama_cpp_preset(f16, tmp / f"ref-{q}.gguf", q)
        if path.stat().st_size <= max_size:
            fitting[q] = evaluate(path)["mean_kl"]
        path.unlink()
    again = evaluate(winner.path)  # loads in llama.cpp; its KL is the one the search measured
    return result, winner, max_size, fitting, again


def _check(result, winner, max_size, fitting, again):
    assert fitting, "the budget must fit at least one preset"
    assert winner.size_bytes <= max_size
    assert again["mean_kl"] == pytest.approx(result.winner.mean_kl, rel=1e-6)
    assert again["mean_kl"] <= min(fitting.values()) * (1 + 1e-6), (result.to_dict(), fitting)
    names = {p.name for p in result.frontier}
    assert set(fitting) <= names  # every fitting preset is on the recorded frontier
    d = result.to_dict()
    assert d["winner"] == result.winner.name and any(p["pareto"] for p in d["frontier"])


def test_auto_tiny_llama(tiny_llama_dir, tmp_path):
    _check(*_run(tiny_llama_dir, tmp_path, between=("Q3_K_M", "Q4_K_M"), n_ctx=128, chunks=4, max_candidates=8))


@pytest.mark.slow
def test_auto_smollm2(smollm2_dir, tmp_path):
    result, *rest = _run(smollm2_dir, tmp_path, between=("Q3_K_L", "Q4_K_S"), n_ctx=256, chunks=3,
                         max_candidates=12)
    _check(result, *rest)


def test_auto_refuses_an_impossible_budget(tiny_llama_dir, tmp_path):
    f16 = convert(tiny_llama_dir, parse_target("gguf:F16"), tmp_path / "f16").path
    cand = LocalCandidates(f16, tmp_path / "work", lambda p: {"mean_kl": 1.0, "ppl_ratio": 1.0}, nthread=2)
    budget = parse_auto_budget({"max_size": "64K", "presets": ["Q2_K"]}, parse_size)
    with pytest.raises(ValidationFailed, match="no candidate meets the budget"):
        cand.search(budget)
