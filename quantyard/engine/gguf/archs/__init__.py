"""Architecture families the GGUF converter supports, one small module each.

`for_config(config)` picks the family from config.json's `architectures[0]`; anything else is an
UnsupportedArchitecture naming the supported set. The list of names here must equal the
manifest's "architectures" entry (a test checks it), so the API can answer without importing us.
"""

from __future__ import annotations

from ...errors import UnsupportedArchitecture
from .base import Architecture, tensor_order_key
from .gemma import Gemma2, Gemma3
from .gpt2 import GPT2
from .llama import Llama
from .phi3 import Phi3
from .qwen import Qwen2, Qwen3

FAMILIES: tuple[type[Architecture], ...] = (Llama, Qwen2, Qwen3, Gemma2, Gemma3, Phi3, GPT2)
BY_HF_NAME: dict[str, type[Architecture]] = {n: cls for cls in FAMILIES for n in cls.hf_architectures}
ARCHITECTURES: tuple[str, ...] = tuple(BY_HF_NAME)


def hf_architecture(config: dict) -> str:
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return str(archs[0])


def for_config(config: dict, tokenizer_vocab_size: int | None = None) -> Architecture:
    name = hf_architecture(config)
    cls = BY_HF_NAME.get(name)
    if cls is None:
        raise UnsupportedArchitecture(
            f"architecture {name!r} cannot be converted to gguf; supported architectures: {', '.join(ARCHITECTURES)}",
            details={"architecture": name, "supported": list(ARCHITECTURES)},
        )
    return cls(config, tokenizer_vocab_size)


__all__ = ["Architecture", "ARCHITECTURES", "FAMILIES", "BY_HF_NAME", "for_config", "hf_architecture",
           "tensor_order_key"]
