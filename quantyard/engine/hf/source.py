"""A Hugging Face model folder, described from config.json and safetensors headers only.

No tensor data is read here and nothing heavy is imported, so preflight can run on a huge model
in milliseconds and reject it before any real work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidModel
from ..jsonsafe import load_json_object
from .safetensors_header import FLOAT_DTYPES, TensorRef, read_safetensors_header
from .sanity import check_against_tensors, check_config_sizes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# config.json is a few KB; an index names each tensor once (~100 bytes each).
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024


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
    """config.json, parsed with caps and its size fields checked (sanity.check_config_sizes)."""
    path = root / "config.json"
    if not path.is_file():
        raise InvalidModel("the source has no config.json; is it a Hugging Face model folder?")
    config = load_json_object(path, name="config.json", max_bytes=MAX_CONFIG_BYTES)
    check_config_sizes(config)
    return config


def _weight_map(index: Path) -> dict[str, str]:
    data = load_json_object(index, name=INDEX_FILE, max_bytes=MAX_INDEX_BYTES)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidModel(f"{INDEX_FILE} lacks a weight_map of tensor name -> file name")
    for fname in set(weight_map.values()):
        # shards sit beside the index: a path would read (or probe) files outside the source
        if not fname or fname != Path(fname).name or fname.startswith(".") or "\\" in fname:
            raise InvalidModel(f"{INDEX_FILE} names {fname[:100]!r}, which is not a file name "
                               "in the model folder", details={"file": INDEX_FILE})
    return weight_map


def _shard_map(root: Path) -> dict[str, list[str]]:
    """Weight file -> tensor names it should hold, from the index or the single-file layout."""
    index = root / INDEX_FILE
    if index.is_file():
        files: dict[str, list[str]] = {}
        for tensor, fname in _weight_map(index).items():
            files.setdefault(fname, []).append(tensor)
        return files
    if (root / SINGLE_FILE).is_file():
        return {SINGLE_FILE: []}  # [] = take whatever the file holds
    found = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (found {', '.join(found)}; only safetensors is supported)" if found else ""
    raise InvalidModel(f"the source has no {SINGLE_FILE} or {INDEX_FILE}{hint}")


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
        raise InvalidModel("the source holds no tensors")
    return tensors


def checked_tensors(root: Path, config: dict) -> dict[str, TensorRef]:
    """The weights' tensors from their headers, held against config.json's sizes (what the
    readers that skip open_source's dtype check, e.g. the ONNX ones, use)."""
    tensors = _collect_tensors(root, _shard_map(root))
    check_against_tensors(config, {name: t.shape for name, t in tensors.items()})
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
        raise InvalidModel("the source is not a directory")
    config = load_config(root)
    shards = _shard_map(root)
    tensors = _collect_tensors(root, shards)
    _check_dtypes(tensors)
    check_against_tensors(config, {name: t.shape for name, t in tensors.items()})
    if require_tokenizer and not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise InvalidModel(f"the source has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    files = tuple(sorted({t.file for t in tensors.values()}))
    return HFModelSource(root=root, config=config, tensors=tensors, weight_files=files)


__all__ = ["HFModelSource", "open_source", "load_config", "checked_tensors"]
