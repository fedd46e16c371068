"""Opening a GGUF in llama.cpp (llama-cpp-python) the way validation needs it.

llama-cpp-python builds libggml for the build machine's CPU (GGML_NATIVE). On CPUs with AMX
(Sapphire Rapids and later) that adds ggml's AMX "extra buffer type", and evaluating a small Q8_0
model through it segfaults the whole process (seen with llama-cpp-python 0.3.36 on this project's
CI machines: every Q8_0 logits check died, the worker with it). The extra buffer types (AMX, and the
CPU repack layouts) are a speed feature of the runtime, not part of what the file means, so
validation turns them off: llama.cpp's plain CPU kernels compute the same model.

`Llama()` takes no switch for it, so its default model parameters are swapped while one model is
constructed (under a lock: the swap is process-wide for that moment).
"""

from __future__ import annotations

import threading
from typing import Any

_construct = threading.Lock()


def open_llama(model_path: str, **kwargs: Any):
    """`llama_cpp.Llama(model_path=..., **kwargs)` without ggml's extra buffer types."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    original = low.llama_model_default_params

    def defaults():
        params = original()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    with _construct:
        low.llama_model_default_params = defaults
        try:
            return llama_cpp.Llama(model_path=model_path, **kwargs)
        finally:
            low.llama_model_default_params = original
