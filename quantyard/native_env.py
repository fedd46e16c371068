"""Process environment for the native runtimes a conversion loads side by side.

One conversion process holds two OpenMP runtimes: torch's bundled libgomp (the transformers
reference, the ONNX export) and the system libgomp that llama.cpp's ggml links. OpenMP's default
wait policy keeps each runtime's idle threads spinning for a while after every parallel region,
so on a small machine one runtime's spinning threads take the cores the other needs: measured on
2 cores, a validation's llama.cpp evaluation ran 5x slower right after the reference forward
(5.4 s vs 0.9 s), and `quantyard convert` of SmolLM2 to F16+Q8_0+Q4_K_M took 25.8 s instead of
15.6 s. A passive wait policy lets idle threads sleep. It is read when a runtime loads, so it is
set before torch or llama_cpp is imported (the CLI does it first thing; every service process is
started through the CLI). A value the operator set is kept.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

NATIVE_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def tune_native_runtimes(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set NATIVE_DEFAULTS in `environ` where the operator has not set them."""
    for name, value in NATIVE_DEFAULTS.items():
        environ.setdefault(name, value)


__all__ = ["NATIVE_DEFAULTS", "tune_native_runtimes"]
