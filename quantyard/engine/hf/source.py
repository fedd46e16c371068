"""A Hugging Face model folder, described from config.json and safetensors headers only.

No tensor data is read here and nothing heavy is imported, so preflight can run on a huge model
in milliseconds and reject it before any real work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidModel
from .safetensors_header import FLOAT_DTYPES, TensorRef, read_safetensors_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


@dataclass(frozen=True)
class HFModelSource:
    root: Path
    config: dict
    tensors: dict[str, TensorRef] = field(repr=False)
    weight_files: tuple[Path, ...]

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else str(self.config.get("model_type", "unknown"))

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def source_dtype(self) -> str:
        """The dtype holding most parameters ("F32", "BF16", ...)."""
        from ..dominant import dominant_type

        return dominant_type((t.dtype, t.n_elements) for t in self.tensors.values())

    @property
    def name(self) -> str:
        return self.root.name

    def has_file(self, name: str) -> bool:
        return (self.root / name).is_file()


def load_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise InvalidModel(f"{root} has no config.json; is it a Hugging Face model folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidModel(f"config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InvalidModel("config.json is not a JSON object")
    return config


def _shard_map(root: Path) -> dict[str, list[str]]:
    """Weight file -> tensor names it should hold, from the index or the single-file layout."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InvalidModel(f"{INDEX_FILE} is unreadable or lacks weight_map ({e!r})") from None
        files: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            files.setdefault(fname, []).append(tensor)
        return files
    if (root / SINGLE_FILE).is_file():
        return {SINGLE_FILE: []}  # [] = take whatever the file holds
    found = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (found {', '.join(found)}; only safetensors is supported)" if found else ""
    raise InvalidModel(f"{root} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _collect_tensors(root: Path, shards: dict[str, list[str]]) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for fname, expected in sorted(shards.items()):
        path = root / fname
        if not path.is_file():
            raise InvalidModel(f"weight file {fname} named by {INDEX_FILE} is missing")
        found, _ = read_safetensors_header(path)
        missing = [n for n in expected if n not in found]
        if missing:
            raise InvalidModel(f"{fname} lacks tensors the index assigns to it: {', '.join(missing[:5])}")
        for name, ref in found.items():
            if name in tensors:
                raise InvalidModel(f"tensor {name!r} appears in both {tensors[name].file.name} and {fname}")
            tensors[name] = ref
    if not tensors:
        raise InvalidModel(f"{root} holds no tensors")
    return tensors


def _check_dtypes(tensors: dict[str, TensorRef]) -> None:
    odd = sorted({t.dtype for t in tensors.values()} - set(FLOAT_DTYPES))
    if odd:
        raise InvalidModel(
            f"source tensors use dtype(s) {', '.join(odd)}; supported source dtypes: {', '.join(FLOAT_DTYPES)}"
        )


def open_source(root: Path, *, require_tokenizer: bool = True) -> HFModelSource:
    """Describe the model at `root` from headers; InvalidModel when anything needed is missing."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidModel(f"source {root} is not a directory")
    config = load_config(root)
    shards = _shard_map(root)
    tensors = _collect_tensors(root, shards)
    _check_dtypes(tensors)
    if require_tokenizer and not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise InvalidModel(f"{root} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    files = tuple(sorted({t.file for t in tensors.values()}))
    return HFModelSource(root=root, config=config, tensors=tensors, weight_files=files)


__all__ = ["HFModelSource", "open_source"]
