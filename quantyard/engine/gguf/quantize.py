"""GGUF -> GGUF quantization, tensor for tensor what llama-quantize writes.

Per-tensor types come from policy.plan_types (llama.cpp's mixture rules), the bytes from ggml's
own quantizers (ggml_quants), with importance weights when an imatrix is given. The input is
memory-mapped and the output written front to back in slabs of rows, so memory stays bounded by
a slab (at most the largest tensor), whatever the model's size. Inputs may be F32/F16/BF16 or
already quantized (requantization: ggml dequantizes first, as llama-quantize
--allow-requantize does; the report names the input type so the service can warn).

Outputs over `split_max_bytes` are written as llama.cpp split sets
(<name>-00001-of-0000N.gguf, split.* keys; all metadata in the first shard), which llama.cpp
loads as one model from the first shard. Files are written under temporary names and renamed
only when every shard is complete; any exception (Cancelled included) removes them.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidModel, ResourceExhausted, UnsupportedTarget
from . import estimate as est
from . import ggml_quants
from . import gguf_output as go
from .ggml_types import FILE_TYPES, GGML_TYPES, QUANTIZATION_VERSION
from .gguf_input import SPLIT_KEYS, GGUFInput, InputTensor, release_pages
from .imatrix import ImatrixData, load_imatrix
from .policy import ModelInfo, TensorChoice, TensorInfo, n_dims, plan_types
from .tensor_types import Overrides, parse_tensor_types

Progress = Callable[[float, str], None]
# values converted per slab: bounds the float32 buffer (64 MiB) on big tensors
_SLAB_VALUES = 16 * 1024 * 1024
# keys this module writes itself; stale copies from the input are dropped
_OWN_KEYS = ("general.file_type", "general.quantization_version", *SPLIT_KEYS)
_IMATRIX_KEY_PREFIX = "quantize.imatrix."


@dataclass
class QuantizeReport:
    quantization: str
    file_type: int  # general.file_type (llama_ftype)
    paths: list[Path]  # one file, or the shards in order
    size_bytes: int
    tensor_count: int
    parameter_count: int
    tensor_types: dict[str, int]  # output ggml type -> tensor count
    requantized_from: str | None  # input's dominant quantized type when it was already quantized
    fallbacks: list[str] = field(default_factory=list)  # tensors whose row forced another type
    imatrix: dict | None = None  # provenance of the importance matrix used
    seconds: float = 0.0

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.size_bytes / self.parameter_count if self.parameter_count else 0.0

    def to_dict(self) -> dict:
        return {"quantization": self.quantization, "file_type": self.file_type,
                "paths": [str(p) for p in self.paths], "size_bytes": self.size_bytes,
                "tensor_count": self.tensor_count, "parameter_count": self.parameter_count,
                "bits_per_weight": round(self.bits_per_weight, 4), "tensor_types": dict(self.tensor_types),
                "requantized_from": self.requantized_from, "fallbacks": list(self.fallbacks),
                "imatrix": self.imatrix, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class _Item:
    """One output tensor: its input, its output type and the importance weights to use."""

    src: InputTensor
    choice: TensorChoice
    entry: go.TensorEntry
    weights: np.ndarray | None  # ne[0] * n_mat float32 values, or None


# ---------------------------------------------------------------------------------------------
# planning

def _file_type(quantization: str):
    ft = FILE_TYPES.get(quantization)
    if ft is None:
        raise UnsupportedTarget(f"unknown GGUF quantization {quantization!r}; "
                                f"known: {', '.join(FILE_TYPES)}")
    return ft


def _imatrix_for(name: str, ne: tuple[int, ...], weights: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """llama-quantize's lookup: a missing entry quantizes without weights; a wrong size is an
    error (except token_embd, which imatrices often carry with another shape)."""
    if weights is None or name not in weights:
        return None
    w = weights[name]
    want = ne[0] * (ne[2] if len(ne) > 2 else 1)
    if w.size == want:
        return w
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return None
    raise InvalidModel(f"imatrix entry for {name} has {w.size} values, the tensor needs {want}; "
                       "was the imatrix computed for another model?")


def _overrides(quantization: str, tensor_types: object) -> Overrides:
    """--tensor-type pairs from params.tensor_types; refused for float targets, where llama.cpp
    would silently ignore them."""
    overrides = parse_tensor_types(tensor_types)
    if overrides and not GGML_TYPES[FILE_TYPES[quantization].base_type].is_quantized:
        raise UnsupportedTarget(f"params.tensor_types applies to quantized GGUF targets, not {quantization}")
    return overrides


def _plan(src: GGUFInput, quantization: str, imatrix: ImatrixData | None,
          overrides: Overrides = ()) -> list[_Item]:
    info = ModelInfo.from_fields(src.small_fields())
    tensors = [TensorInfo(t.name, t.ne, t.type_name) for t in src.tensors.values()]
    choices = plan_types(tensors, info, quantization, has_imatrix=imatrix is not None, overrides=overrides)
    weights = imatrix.weights() if imatrix is not None else None
    items = []
    for c in choices:
        t = src.tensors[c.name]
        w = _imatrix_for(c.name, t.ne, weights) if c.quantize else None
        if c.quantize and c.needs_imatrix and w is None:
            why = "no importance matrix was given" if imatrix is None else "the imatrix has no entry for it"
            raise UnsupportedTarget(f"{quantization} quantizes {c.name} to {c.type_name}, which needs an "
                                    f"importance matrix, but {why}")
        ne = tuple(t.ne[: n_dims(t.ne)])
        type_id = GGML_TYPES[c.type_name].id if c.quantize else t.type_id
        nbytes = _nbytes(t, type_id) if c.quantize else int(t.raw.nbytes)
        items.append(_Item(t, c, go.TensorEntry(c.name, ne, type_id, nbytes), w))
    return items


def _nbytes(t: InputTensor, type_id: int) -> int:
    return ggml_quants.row_size(type_id, t.ne[0]) * (t.n_elements // t.ne[0])


def _requantized_from(items: list[_Item]) -> str | None:
    """The input's quantized type (most common by size) if any quantized tensor is re-encoded."""
    sizes: Counter = Counter()
    for it in items:
        if it.choice.quantize and it.src.type_name not in ("F32", "F16", "BF16"):
            sizes[it.src.type_name] += it.src.raw.nbytes
    return sizes.most_common(1)[0][0] if sizes else None


# ---------------------------------------------------------------------------------------------
# metadata and shards

def _metadata(src: GGUFInput, quantization: str, imatrix: ImatrixData | None,
              extra: Mapping[str, object] | None) -> list[bytes]:
    """The input's KV pairs (minus what we rewrite) + file type + imatrix provenance + extras,
    in llama-quantize's order (it re-appends the keys it sets)."""
    extra = dict(extra or {})
    drop = set(_OWN_KEYS) | set(extra)
    kv = [src.raw_kv(k) for k in src.keys()
          if k not in drop and not k.startswith(_IMATRIX_KEY_PREFIX)]
    kv.append(go.encode_kv("general.quantization_version", go.UINT32, QUANTIZATION_VERSION))
    kv.append(go.encode_kv("general.file_type", go.UINT32, FILE_TYPES[quantization].llama_ftype))
    if imatrix is not None:
        p = imatrix.provenance()
        kv.append(go.encode_kv("quantize.imatrix.file", go.STRING, (p["file"] or "imatrix.gguf")[:127]))
        if p["dataset"]:
            kv.append(go.encode_kv("quantize.imatrix.dataset", go.STRING, p["dataset"][:127]))
        kv.append(go.encode_kv("quantize.imatrix.entries_count", go.UINT32, p["entries_count"]))
        if p["chunks_count"] > 0:
            kv.append(go.encode_kv("quantize.imatrix.chunks_count", go.UINT32, p["chunks_count"]))
    kv.extend(go.encode_auto(k, v) for k, v in extra.items())
    return kv


def _split_keys(no: int, count: int, n_tensors: int) -> list[bytes]:
    return [go.encode_kv("split.no", go.UINT16, no), go.encode_kv("split.count", go.UINT16, count),
            go.encode_kv("split.tensors.count", go.INT32, n_tensors)]


def _shards(items: list[_Item], kv: list[bytes], max_bytes: int | None, alignment: int) -> list[list[_Item]]:
    """Greedy split in tensor order, as llama-gguf-split --split-max-size does, but counting each
    shard's header too so no file exceeds max_bytes (unless one tensor alone does)."""
    if not max_bytes or go.file_size(kv, [i.entry for i in items], alignment) <= max_bytes:
        return [items]
    shards: list[list[_Item]] = [[]]
    size = go.header_size(kv + _split_keys(0, 1, 0), [], alignment) + alignment
    for it in items:
        need = go.info_size(it.entry) + go.pad(it.entry.nbytes, alignment)
        if shards[-1] and size + need > max_bytes:
            shards.append([])
            size = go.header_size(_split_keys(0, 1, 0), [], alignment) + alignment
        shards[-1].append(it)
        size += need
    return shards


def shard_paths(output_path: Path, count: int) -> list[Path]:
    """llama.cpp's llama_split_path: <prefix>-00001-of-00003.gguf, prefix = name minus .gguf."""
    output_path = Path(output_path)
    if count == 1:
        return [output_path]
    stem = output_path.name[:-5] if output_path.name.endswith(".gguf") else output_path.name
    return [output_path.with_name(f"{stem}-{i + 1:05d}-of-{count:05d}.gguf") for i in range(count)]


# ---------------------------------------------------------------------------------------------
# writing

@dataclass(frozen=True)
class _Slab:
    """Rows [first, first+count) of one tensor, quantized with `weights` (one expert's slice)."""

    item: _Item
    first: int
    count: int
    weights: np.ndarray | None


def _slabs(it: _Item) -> list[_Slab]:
    """A converted tensor in row slabs that never cross an expert boundary (each expert has its
    own imatrix slice); none for a tensor copied as is."""
    if not it.choice.quantize:
        return []
    t = it.src
    n = t.ne[0]
    rows_per_mat = t.ne[1] if len(t.ne) > 1 else 1
    n_mat = t.n_elements // n // rows_per_mat
    step = max(1, _SLAB_VALUES // n)
    return [_Slab(it, m * rows_per_mat + r, min(step, rows_per_mat - r),
                  it.weights[m * n:(m + 1) * n] if it.weights is not None else None)
            for m in range(n_mat) for r in range(0, rows_per_mat, step)]


def _rows(slab: _Slab) -> np.ndarray:
    return np.ascontiguousarray(slab.item.src.rows_f32(slab.first, slab.count), dtype=np.float32)


def _write_shard(path: Path, kv: list[bytes], items: list[_Item], alignment: int, nthread: int,
                 on_tensor: Callable[[_Item], None]) -> None:
    """Header, then every tensor: copied when its type does not change, else quantized slab by
    slab. The next slab is read and widened to float32 in a helper thread while ggml quantizes
    the current one on `nthread` threads, so the serial read/convert/write steps overlap the
    kernel; bytes and order are the serial path's."""
    plan = [(it, _slabs(it)) for it in items]
    queue = [s for _, slabs in plan for s in slabs]
    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="quantize-read") as pool:
        go.write_header(f, kv, [i.entry for i in items], alignment)
        pending = pool.submit(_rows, queue[0]) if queue else None
        k = 0
        try:
            for it, slabs in plan:
                start = f.tell()
                if not slabs:
                    f.write(it.src.raw.data)  # a memoryview of the mapped bytes
                for slab in slabs:
                    assert pending is not None
                    rows = pending.result()
                    k += 1
                    pending = pool.submit(_rows, queue[k]) if k < len(queue) else None
                    f.write(ggml_quants.quantize_rows(rows, it.entry.type_id, slab.weights, nthread).data)
                    del rows
                written = f.tell() - start
                if written != it.entry.nbytes:
                    raise RuntimeError(f"{it.entry.name}: wrote {written} bytes, planned {it.entry.nbytes}")
                go.write_padding(f, written, alignment)
                release_pages(it.src.raw)  # keep peak memory at one tensor, not the whole input
                on_tensor(it)
        finally:
            if pending is not None:
                pending.cancel()


@contextlib.contextmanager
def _remove_on_error(paths: list[Path]):
    try:
        yield
    except BaseException:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise


def _load_imatrix_arg(imatrix) -> ImatrixData | None:
    if imatrix is None or isinstance(imatrix, ImatrixData):
        return imatrix
    return load_imatrix(Path(imatrix))


def quantize_gguf(
    input_path: Path, output_path: Path, quantization: str, *, imatrix: ImatrixData | Path | str | None = None,
    progress: Progress | None = None, extra_metadata: Mapping[str, object] | None = None,
    split_max_bytes: int | None = None, nthread: int | None = None, tensor_types: object = None,
) -> QuantizeReport:
    """Quantize the GGUF at `input_path` (a file or the first shard of a split set) to
    `quantization`, writing `output_path` (or its shards). `progress(fraction, message)` is
    called after every tensor and may raise Cancelled. `tensor_types` are per-tensor overrides
    ({pattern: ggml type}, llama-quantize --tensor-type; see tensor_types.py)."""
    started = time.monotonic()
    ft = _file_type(quantization)
    output_path = Path(output_path)
    nthread = nthread or os.cpu_count() or 1
    if output_path.exists() and output_path.resolve() == Path(input_path).resolve():
        raise UnsupportedTarget(f"input and output are the same file: {output_path}")
    overrides = _overrides(quantization, tensor_types)
    imat = _load_imatrix_arg(imatrix)
    with GGUFInput(Path(input_path)) as src:
        items = _plan(src, quantization, imat, overrides)
        kv = _metadata(src, quantization, imat, extra_metadata)
        shards = _shards(items, kv, split_max_bytes, src.alignment)
        finals = shard_paths(output_path, len(shards))
        temps = [p.with_name(f".{p.name}.{uuid.uuid4().hex}.partial") for p in finals]
        output_path.parent.mkdir(parents=True, exist_ok=True)
        total = sum(i.entry.nbytes for i in items) or 1
        done = 0

        def on_tensor(it: _Item) -> None:
            nonlocal done
            done += it.entry.nbytes
            if progress is not None:
                progress(min(done / total, 1.0), f"quantized {it.entry.name} to {it.choice.type_name}")

        with _remove_on_error(temps):
            try:
                for i, (tmp, shard) in enumerate(zip(temps, shards, strict=False)):
                    split = _split_keys(i, len(shards), len(items)) if len(shards) > 1 else []
                    shard_kv = (kv if i == 0 else []) + split
                    _write_shard(tmp, shard_kv, shard, src.alignment, nthread, on_tensor)
            except OSError as e:
                if e.errno == 28:  # ENOSPC
                    raise ResourceExhausted(f"out of disk space writing {output_path.name}") from e
                raise
            for tmp, final in zip(temps, finals, strict=False):
                os.replace(tmp, final)
    return _report(quantization, ft.llama_ftype, finals, items, imat, time.monotonic() - started)


def _report(quantization: str, ftype: int, paths: list[Path], items: list[_Item],
            imat: ImatrixData | None, seconds: float) -> QuantizeReport:
    types = Counter(i.choice.type_name for i in items)
    return QuantizeReport(
        quantization=quantization, file_type=ftype, paths=paths,
        size_bytes=sum(p.stat().st_size for p in paths), tensor_count=len(items),
        parameter_count=sum(i.src.n_elements for i in items), tensor_types=dict(sorted(types.items())),
        requantized_from=_requantized_from(items), fallbacks=[i.entry.name for i in items if i.choice.fell_back],
        imatrix=imat.provenance() if imat is not None else None, seconds=seconds)


def planned_data_bytes(tensors: list[TensorInfo], info: ModelInfo, quantization: str, alignment: int = 32, *,
                       has_imatrix: bool = True) -> int:
    """Tensor-data bytes of the `quantization` output for a model described by GGUF tensor infos
    (names, ggml shapes, input types) and hparams: sizes before anything is converted."""
    return sum(go.pad(t.nbytes, alignment)
               for t in est.quantized_tensors(tensors, info, quantization, has_imatrix=has_imatrix))


def estimate_size(input_path: Path, quantization: str, *, has_imatrix: bool | None = None,
                  tensor_types: object = None) -> int:
    """Bytes the output of quantize_gguf(input_path, ..., quantization) will take, from the
    headers: llama-quantize's type for every tensor, the input's KV as _metadata rewrites it,
    alignment padding. `has_imatrix` (default: whether the type needs one) changes a few types
    and adds the quantize.imatrix.* keys. Extra metadata the caller adds is not counted.
    `tensor_types` as for quantize_gguf (the auto search sizes mixtures with it)."""
    ft = _file_type(quantization)
    overrides = _overrides(quantization, tensor_types)
    has_imatrix = ft.needs_imatrix if has_imatrix is None else has_imatrix
    with GGUFInput(Path(input_path)) as src:
        info = ModelInfo.from_fields(src.small_fields())
        tensors = [TensorInfo(t.name, t.ne, t.type_name) for t in src.tensors.values()]
        kv = sum(len(b) for b in _metadata(src, quantization, None, None))
        kv += est.imatrix_kv_bytes() if has_imatrix else 0
        planned = est.quantized_tensors(tensors, info, quantization, has_imatrix=has_imatrix, overrides=overrides)
        return est.file_bytes(kv, planned, src.alignment)


__all__ = ["quantize_gguf", "QuantizeReport", "shard_paths", "estimate_size", "planned_data_bytes"]
