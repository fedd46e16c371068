"""The PyTorch side of an ONNX conversion: describe a Hugging Face folder, load it safely.

Pickled weights (.bin/.pt/.pth) are only ever read with torch.load(weights_only=True): a pickle
that names anything but tensors and plain containers is refused before any of it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidModel, UnsupportedArchitecture
from ..hf.source import TOKENIZER_FILES, load_config
from .manifest import SUPPORTED, TASKS

PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "pytorch_model.pt")


@dataclass(frozen=True)
class EncoderSource:
    root: Path
    config: dict
    architecture: str
    task: str
    # "safetensors" or the pickle file's name (read weights_only)
    weights: str


def describe(root: Path) -> EncoderSource:
    """config.json and file names only: architecture, task, where the weights are."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidModel("the source is not a model folder")
    config = load_config(root)
    archs = config.get("architectures") or [str(config.get("model_type", "unknown"))]
    if archs[0] not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"architecture {archs[0]!r} cannot be converted to onnx; supported architectures: {', '.join(SUPPORTED)}",
            details={"architecture": archs[0], "supported": list(SUPPORTED)},
        )
    if not any((root / f).is_file() for f in TOKENIZER_FILES + ("vocab.txt",)):
        raise InvalidModel("the model has no tokenizer (tokenizer.json or vocab.txt)")
    return EncoderSource(root, config, archs[0], TASKS[archs[0]], _weights_kind(root))


def encoder_dims(config: dict) -> dict[str, int]:
    """hidden size, attention heads and FFN width from config.json; DistilBERT names them
    dim / n_heads / hidden_dim where the rest of the BERT family says hidden_size / ..."""
    keys = {"hidden_size": ("hidden_size", "dim"), "num_attention_heads": ("num_attention_heads", "n_heads"),
            "intermediate_size": ("intermediate_size", "hidden_dim")}
    dims = {}
    for name, options in keys.items():
        found = next((config[k] for k in options if isinstance(config.get(k), int)), None)
        if found is None:
            raise InvalidModel(f"config.json has no {' or '.join(options)}")
        dims[name] = int(found)
    return dims


def _weights_kind(root: Path) -> str:
    if (root / "model.safetensors").is_file() or (root / "model.safetensors.index.json").is_file():
        return "safetensors"
    for name in PICKLE_NAMES:
        if (root / name).is_file():
            return name
    raise InvalidModel(f"the model has no weights (model.safetensors or {', '.join(PICKLE_NAMES)})")


def load_pickled_state_dict(path: Path) -> dict:
    """Tensors from a torch pickle without executing it; InvalidModel if it holds anything else.

    Always torch's weights_only unpickler (tensors and plain containers; explicit weights_only=True
    is not overridable by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), memory-mapped for zip checkpoints
    (every torch.save since 1.6), and never a second, unrestricted attempt."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as e:  # any failure of the restricted unpickler or the zip under it: refused
        raise InvalidModel(
            f"refused to load {path.name}: it is a pickle that is not plain tensors (it would run code or "
            f"build arbitrary objects, which Quantyard never unpickles); save the weights as safetensors",
            details={"file": path.name, "reason": "unsafe_pickle", "error": type(e).__name__},
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidModel(f"{path.name} is not a state dict of tensors", details={"file": path.name})
    return state


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_model(src: EncoderSource):
    """The source as an fp32 torch module in eval mode, proven to be the upload's weights (every
    tensor used, nothing left to random initialisation: engine/hf/strict_load.py)."""
    import transformers

    from ..hf.strict_load import load_pretrained, load_state_dict_strict

    cls = getattr(transformers, src.architecture)
    if src.weights == "safetensors":
        # safetensors only: transformers must never fall back to a pickle in the same folder
        return load_pretrained(cls, src.root).float().eval()
    state = load_pickled_state_dict(src.root / src.weights)
    model = cls(cls.config_class.from_pretrained(src.root))
    return load_state_dict_strict(model, state, src.weights).float().eval()


def load_tokenizer(src: EncoderSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src.root)


def parameter_count(src: EncoderSource) -> int:
    """From safetensors headers when there are some; else from the pickle, loaded weights-only."""
    if src.weights == "safetensors":
        from ..hf.source import _collect_tensors, _shard_map

        return sum(t.n_elements for t in _collect_tensors(src.root, _shard_map(src.root)).values())
    return sum(t.numel() for t in load_pickled_state_dict(src.root / src.weights).values())


__all__ = ["EncoderSource", "describe", "encoder_dims", "load_model", "load_pickled_state_dict", "load_tokenizer",
           "parameter_count"]
