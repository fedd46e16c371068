"""gguf:auto as a target step: run the search on the intermediate against the source's stored
evaluation reference, for stages.quantize, which then writes the winner (base preset + tensor
types) like any GGUF target, validates it and holds it to its gates. Every candidate is written
with ggml's kernels and measured with llama.cpp (evaluation.evaluate_gguf); progress (which may
raise Cancelled) is reported before each candidate."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import UnsupportedTarget
from ..frontier import FrontierPoint
from ..spec import TargetSpec, parse_size
from .auto import AutoResult, mixture_name, search_auto
from .auto_budget import parse_auto_budget
from .auto_local import LocalCandidates
from .tensor_types import Overrides

Progress = Callable[[float, str], None]


def choose_auto(input_gguf: Path, target: TargetSpec, work_dir: Path, *, evaluation, imatrix: Path | None = None,
                extra_metadata: Mapping[str, object] | None = None, known: Mapping[str, FrontierPoint] | None = None,
                progress: Progress | None = None, nthread: int | None = None) -> AutoResult:
    """The winner and frontier of gguf:auto for `target` (params: auto_budget.py); `known`:
    preset points already measured for this source (reused, not made again)."""
    from ..evaluation import evaluate_gguf

    if evaluation is None:
        raise UnsupportedTarget("gguf:auto needs the source's evaluation reference (a Hugging Face or GGUF source)")
    budget = parse_auto_budget(target.params, parse_size)
    cand = LocalCandidates(Path(input_gguf), Path(work_dir),
                           lambda p: evaluate_gguf(p, evaluation, threads=nthread).to_dict(),
                           imatrix=imatrix, extra_metadata=extra_metadata, nthread=nthread)
    count = [0]

    def measure(quantization: str, overrides: Overrides) -> FrontierPoint:
        if progress is not None:
            progress(min(count[0] / budget.max_candidates, 0.99), f"auto: measuring {mixture_name(quantization, overrides)}")
        count[0] += 1
        return cand.measure(quantization, overrides)

    return search_auto(budget=budget, tensor_names=cand.tensor_names(), size_of=cand.size_of, measure=measure,
                       known=known)


__all__ = ["choose_auto"]
