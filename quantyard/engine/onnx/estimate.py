"""Size, memory and disk a target will need, from safetensors headers only."""

from __future__ import annotations

# bytes per parameter of linear weights, and of tensors the scheme leaves in float
# (int8-static keeps embeddings and FFN down-projections; int4 quantizes MatMul weights only)
_LINEAR = {"fp32": 4.0, "fp16": 2.0, "int8-dynamic": 1.0, "int8-static": 1.0, "int4": 0.5 + 4 / 32}
_OTHER = {"fp32": 4.0, "fp16": 2.0, "int8-dynamic": 1.0, "int8-static": 4.0, "int4": 4.0}


def split_parameters(tensors) -> tuple[int, int]:
    """(parameters in linear weights, all other parameters)."""
    linear = sum(t.n_elements for name, t in tensors.items()
                 if len(t.shape) == 2 and "embeddings" not in name)
    total = sum(t.n_elements for t in tensors.values())
    return linear, total - linear


def estimate(tensors, quantization: str) -> dict[str, int]:
    linear, other = split_parameters(tensors)
    size = int(linear * _LINEAR[quantization] + other * _OTHER[quantization]) + 1_000_000
    fp32 = (linear + other) * 4
    # torch model + exported fp32 + optimizer's copy + output, all in memory at the export peak
    return {"size_bytes": size, "peak_memory_bytes": 3 * fp32 + size, "disk_bytes": 2 * fp32 + size}


__all__ = ["estimate", "split_parameters"]
