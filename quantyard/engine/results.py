"""Result records the engine returns (pure Python)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PreflightReport:
    architecture: str
    parameter_count: int
    source_dtype: str
    # target key ("gguf:Q8_0") -> {"size_bytes": int, "peak_memory_bytes": int}
    estimates: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    format: str
    quantization: str
    size_bytes: int
    metadata: dict
    metrics: dict
    engine_version: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


__all__ = ["PreflightReport", "ConversionResult"]
