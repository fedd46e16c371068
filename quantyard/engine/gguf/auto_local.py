"""gguf:auto's callables for one GGUF input on this machine: size from the headers, candidates
written with ggml's kernels (quantize_gguf) and measured by the evaluation report (llama.cpp,
against the source's stored EvalReference). Each measured file is deleted at once (disk stays at
one candidate); the winner is written again by `write_winner`, byte for byte the file measured
(quantization is deterministic)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..frontier import FrontierPoint
from .auto import AutoResult, mixture_name, search_auto
from .auto_budget import AutoBudget
from .gguf_input import GGUFInput
from .quantize import QuantizeReport, estimate_size, quantize_gguf
from .tensor_types import Overrides

# evaluate(path) -> a dict with at least mean_kl and ppl_ratio (evaluation.QualityReport.to_dict())
Evaluate = Callable[[Path], Mapping[str, Any]]


class LocalCandidates:
    def __init__(self, input_gguf: Path, work_dir: Path, evaluate: Evaluate, *, imatrix: Path | None = None,
                 extra_metadata: Mapping[str, object] | None = None, nthread: int | None = None) -> None:
        self.input, self.work_dir, self.evaluate = Path(input_gguf), Path(work_dir), evaluate
        self.imatrix, self.extra, self.nthread = imatrix, dict(extra_metadata or {}), nthread
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[tuple[str, Overrides], int] = {}

    def tensor_names(self) -> list[str]:
        with GGUFInput(self.input) as src:
            return list(src.tensors)

    def size_of(self, quantization: str, overrides: Overrides) -> int:
        key = (quantization, overrides)
        if key not in self._sizes:
            self._sizes[key] = estimate_size(self.input, quantization, has_imatrix=self.imatrix is not None,
                                             tensor_types=overrides)
        return self._sizes[key]

    def write(self, quantization: str, overrides: Overrides, out: Path) -> QuantizeReport:
        return quantize_gguf(self.input, out, quantization, imatrix=self.imatrix, extra_metadata=self.extra,
                             nthread=self.nthread, tensor_types=overrides)

    def measure(self, quantization: str, overrides: Overrides) -> FrontierPoint:
        name = mixture_name(quantization, overrides)
        out = self.work_dir / f"candidate-{name.replace(':', '-')}.gguf"
        try:
            report = self.write(quantization, overrides, out)
            quality = dict(self.evaluate(out))
        finally:
            out.unlink(missing_ok=True)
        return FrontierPoint(name=name, size_bytes=report.size_bytes, bits_per_weight=round(report.bits_per_weight, 4),
                             mean_kl=quality.get("mean_kl"), ppl_ratio=quality.get("ppl_ratio"),
                             tensor_types=dict(overrides) or None,
                             extra={"base": quantization, "top1_agreement": quality.get("top1_agreement"),
                                    "kl_p99": quality.get("kl_p99")})

    def search(self, budget: AutoBudget, *, known: Mapping[str, FrontierPoint] | None = None) -> AutoResult:
        return search_auto(budget=budget, tensor_names=self.tensor_names(), size_of=self.size_of,
                           measure=self.measure, known=known)

    def write_winner(self, result: AutoResult, out: Path) -> QuantizeReport:
        report = self.write(result.winner_quantization, result.winner_overrides, out)
        if report.size_bytes != result.winner.size_bytes:  # would mean quantization is not deterministic
            raise RuntimeError(f"gguf:auto winner rewritten with {report.size_bytes} bytes, measured "
                               f"{result.winner.size_bytes}")
        return report


__all__ = ["LocalCandidates", "Evaluate"]
