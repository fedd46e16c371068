"""Importance matrices: compute one with torch, read and write llama.cpp's imatrix files.

An importance matrix holds, for every weight matrix W the model multiplies activations x by,
the per-input-column sum of x_j^2 over the calibration tokens and the token count. ggml's
quantizers weight each column's rounding error by sum/count, so the columns that carry large
activations are kept most precise.

llama-imatrix (tools/imatrix/imatrix.cpp) collects these from ggml's mul_mat inputs while it runs
the model over the calibration text in chunks of n_ctx tokens, each chunk starting with BOS. We
run the Hugging Face model instead, with hooks on its linear layers, over the same chunks, and
name each entry after the GGUF tensor the layer becomes (blk.N.attn_q.weight, ...).

File format (what llama-imatrix writes and llama-quantize reads, common/imatrix-loader.cpp): a GGUF
with general.type = "imatrix", imatrix.datasets (string array), imatrix.chunk_count and
imatrix.chunk_size (u32), and two F32 tensors per entry, "<name>.in_sum2" [ne0, n_mat] and
"<name>.counts" [1, n_mat]. The legacy ".dat" layout is also read.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..digest import file_sha256
from ..errors import InvalidModel
from . import gguf_output as go
from .gguf_layout import array_values, read_layout
from .policy import n_dims

if TYPE_CHECKING:  # torch is imported only when an imatrix is computed
    from torch import Tensor
    from torch.nn import Module

DEFAULT_DATASET = "quantyard-calibration-v1"
DEFAULT_N_CTX = 512
# llama-imatrix ignores matrix multiplications over fewer tokens than this
_MIN_TOKENS_PER_CALL = 16
# tokens per forward pass (chunks are batched up to this)
_TOKENS_PER_BATCH = 2048


def default_calibration_text() -> str:
    """The calibration text shipped with Quantyard: English prose, code in several languages,
    structured data, math and text in a dozen other languages."""
    return resources.files("quantyard.engine.data").joinpath("calibration.txt").read_text(encoding="utf-8")


@dataclass
class ImatrixData:
    """Per-tensor activation statistics: sums[name] is float32 (n_mat, ne0), counts[name] int64
    (n_mat,). For a legacy .dat file the sums are already averages times ncall (its layout)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False
    path: Path | None = None
    sha256: str | None = None

    def weights(self) -> dict[str, np.ndarray]:
        """The per-column importance llama-quantize hands the quantizers (tools/quantize:
        load_imatrix): sums/count per matrix in float32, 1 where a matrix saw no tokens."""
        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name]
            if self.is_legacy:
                ncall = int(counts[0]) if len(counts) else 0
                w = sums / np.float32(ncall) if ncall > 0 else sums.copy()
            else:
                c = counts.astype(np.float32)[:, None]
                with np.errstate(divide="ignore", invalid="ignore"):
                    w = np.where(c > 0, sums / np.where(c > 0, c, 1), np.float32(1))
            out[name] = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
        return out

    def provenance(self) -> dict:
        """What the quantize.imatrix.* keys and the lineage record say about this matrix."""
        return {
            "file": self.path.name if self.path else None,
            "dataset": self.datasets[0] if self.datasets else None,
            "entries_count": len(self.sums),
            "chunks_count": self.chunk_count,
            "sha256": self.sha256,
        }

    def save(self, path: Path) -> Path:
        """Write llama-imatrix's GGUF format; records the file's path and sha256."""
        path = Path(path)
        kv = [go.encode_kv("general.type", go.STRING, "imatrix"),
              go.encode_kv("imatrix.datasets", go.ARRAY, self.datasets, go.STRING),
              go.encode_kv("imatrix.chunk_count", go.UINT32, int(self.chunk_count)),
              go.encode_kv("imatrix.chunk_size", go.UINT32, int(self.chunk_size))]
        blobs = []
        for name in sorted(self.sums):  # llama-imatrix sorts for a deterministic file
            sums = np.ascontiguousarray(self.sums[name], dtype=np.float32)
            counts = np.ascontiguousarray(self.counts[name], dtype=np.float32)
            n_mat, ne0 = sums.shape
            blobs.append((f"{name}.in_sum2", _ne((ne0, n_mat)), sums.tobytes()))
            blobs.append((f"{name}.counts", _ne((1, n_mat)), counts.tobytes()))
        tensors = [go.TensorEntry(n, ne, 0, len(b)) for n, ne, b in blobs]
        with open(path, "wb") as f:
            go.write_header(f, kv, tensors, 32)
            for _, _, b in blobs:
                f.write(b)
                go.write_padding(f, len(b), 32)
        self.path, self.sha256 = path, file_sha256(path)
        return path


def _ne(ne: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(ne[: n_dims(ne)])


# ---------------------------------------------------------------------------------------------
# reading

def load_imatrix(path: Path) -> ImatrixData:
    """Read an imatrix file in llama.cpp's GGUF format or its legacy .dat format."""
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"imatrix file {path.name} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    data = _load_gguf(path) if magic == go.GGUF_MAGIC else _load_legacy(path)
    if not data.sums:
        raise InvalidModel(f"imatrix file {path.name} holds no entries")
    data.path, data.sha256 = path, file_sha256(path)
    return data


def _load_gguf(path: Path) -> ImatrixData:
    """Through the strict header reader (gguf_layout: counts capped, tensors inside the file),
    then each F32 tensor read straight from its offset."""
    layout = read_layout(path)
    kv = layout.kv
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in kv]
    if missing:  # llama-quantize refuses such files ("missing imatrix metadata")
        raise InvalidModel(f"imatrix file {path.name} lacks {', '.join(missing)}")
    datasets = array_values(kv["imatrix.datasets"], path) if kv["imatrix.datasets"].array_length is not None else None
    chunk_count, chunk_size = kv["imatrix.chunk_count"].value, kv["imatrix.chunk_size"].value
    if (not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets)
            or type(chunk_count) is not int or type(chunk_size) is not int):
        raise InvalidModel(f"imatrix file {path.name}: imatrix.datasets must be strings and "
                           "imatrix.chunk_count/chunk_size integers")
    parts: dict[str, dict[str, np.ndarray]] = {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for t in layout.tensors:
        for suffix in (".in_sum2", ".counts"):
            if t.name.endswith(suffix):
                if t.type_id != 0:
                    raise InvalidModel(f"imatrix tensor {t.name} is not F32")
                start = layout.data_offset + t.offset  # read_layout checked it lies in the file
                raw = np.array(data[start:start + t.nbytes])  # a copy: the map is dropped below
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = raw.view("<f4").astype(np.float32)
    del data
    sums, counts = {}, {}
    for name, p in parts.items():
        if set(p) != {".in_sum2", ".counts"}:
            raise InvalidModel(f"imatrix entry {name} has sums without counts or the reverse")
        n_mat = p[".counts"].size
        if n_mat == 0 or p[".in_sum2"].size % n_mat:
            raise InvalidModel(f"imatrix entry {name}: its sums do not split into {n_mat} matrices")
        sums[name] = p[".in_sum2"].reshape(n_mat, -1)
        counts[name] = np.rint(p[".counts"]).astype(np.int64)  # std::lround
    return ImatrixData(sums, counts, datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size)


def _load_legacy(path: Path) -> ImatrixData:
    """Legacy layout: n_entries, then per entry (name, ncall, nval, nval floats), then optional
    chunk count and dataset name."""
    buf = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return vals

    try:
        (n_entries,) = take("<i")
        if n_entries < 1:
            raise InvalidModel(f"imatrix file {path.name} holds no entries")
        sums, counts = {}, {}
        for _ in range(n_entries):
            (n,) = take("<i")
            name = buf[pos:pos + n].decode("utf-8")
            pos += n
            ncall, nval = take("<ii")
            sums[name] = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).reshape(1, nval).copy()
            pos += 4 * nval
            counts[name] = np.array([ncall], dtype=np.int64)
        chunk_count, datasets = 0, []
        if pos < len(buf):
            (chunk_count,) = take("<i")
            if pos + 4 <= len(buf):
                (n,) = take("<i")
                if n > 0:
                    datasets.append(buf[pos:pos + n].decode("utf-8", "replace"))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise InvalidModel(f"{path.name} is neither a GGUF nor a legacy imatrix file: {e}") from e
    return ImatrixData(sums, counts, datasets=datasets, chunk_count=chunk_count, is_legacy=True)


# ---------------------------------------------------------------------------------------------
# computing, with the Hugging Face model

def gguf_names_for(module_names: list[str], gguf_arch: str, n_blocks: int) -> dict[str, str]:
    """HF module name -> GGUF weight name, from gguf-py's own table for the architecture (the one
    convert_hf_to_gguf uses), so new architectures need no table here. Wrapper prefixes such as
    Gemma 3's `model.language_model.` are tried away when the full name is unknown."""
    import gguf

    archs = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if gguf_arch not in archs:
        raise InvalidModel(f"gguf-py does not know the architecture {gguf_arch!r}")
    tmap = gguf.get_tensor_name_map(archs[gguf_arch], n_blocks)
    out = {}
    for name in module_names:
        parts = name.split(".")
        candidates = [name, name.replace("language_model.", "")] + [".".join(parts[i:]) for i in range(1, len(parts))]
        for cand in candidates:
            mapped = tmap.get_name(cand)
            if mapped:
                out[name] = mapped + ".weight"
                break
    return out


class _Collector:
    """Forward pre-hooks that add up x_j^2 per input column of every hooked layer, in float64
    (llama.cpp adds in float32; float64 keeps our side the more exact one)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def hook(self, gguf_name: str):
        def pre_hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(dtype=_torch().float64)
            if x.shape[0] < _MIN_TOKENS_PER_CALL:
                return
            acc = self.sums.get(gguf_name)
            sq = (x * x).sum(0)
            self.sums[gguf_name] = sq if acc is None else acc + sq
            self.counts[gguf_name] = self.counts.get(gguf_name, 0) + x.shape[0]

        return pre_hook


def _torch():
    import torch

    return torch


def _tokens(tokenizer, text: str) -> tuple[list[int], int | None]:
    """The whole text's ids with the tokenizer's special tokens (BOS), as llama-imatrix's
    common_tokenize(..., add_special=true), and the BOS id if the tokenizer adds one."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    adds_bos = bos is not None and ids[:1] == [bos] and plain[:1] != [bos]
    return ids, (bos if adds_bos else None)


def _chunk(ids: list[int], c: int, n_ctx: int, bos: int | None) -> list[int]:
    """Chunk c of the token stream, its first token replaced by BOS (llama-imatrix does so)."""
    chunk = ids[c * n_ctx:(c + 1) * n_ctx]
    return [bos] + chunk[1:] if bos is not None else chunk


def _linear_modules(model) -> list[tuple[str, Module]]:
    """The modules whose weight llama.cpp multiplies activations by: nn.Linear, and the Conv1D
    that GPT-2 uses for the same job."""
    torch = _torch()
    kinds: list[type[Module]] = [torch.nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        kinds.append(Conv1D)
    except ImportError:  # older transformers layouts
        pass
    linear = tuple(kinds)  # named, so that mypy narrows by it
    return [(n, m) for n, m in model.named_modules() if isinstance(m, linear)]


def compute_imatrix(
    model_dir: Path, *, gguf_arch: str, n_blocks: int, text: str | None = None, dataset: str | None = None,
    n_ctx: int = DEFAULT_N_CTX, max_chunks: int | None = None,
    gguf_tensors: Mapping[str, tuple[int, ...]] | None = None,
    progress: Callable[[float, str], None] | None = None, threads: int | None = None,
) -> ImatrixData:
    """Run the HF model in `model_dir` over `text` (default: the shipped calibration text) in
    chunks of `n_ctx` tokens, BOS first in each chunk, and collect activation statistics for
    every block weight (llama-imatrix does not collect output.weight by default either).

    `gguf_arch`/`n_blocks` name the GGUF architecture (general.architecture) and block count;
    `gguf_tensors` ({name: ggml ne}) of the model's GGUF, when given, drops entries whose name or
    row length the GGUF does not have, so a mapping mistake can't reach the quantizer."""
    torch = _torch()
    from transformers import AutoModelForCausalLM

    from ..hf.tokenizer_cache import shared_tokenizer

    dataset = dataset or (DEFAULT_DATASET if text is None else "user-calibration-text")
    text = default_calibration_text() if text is None else text
    with shared_tokenizer(Path(model_dir)) as tokenizer:  # the one the vocab and validation use
        ids, bos = _tokens(tokenizer, text)
    n_chunks = len(ids) // n_ctx if n_ctx > 0 else 0
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_ctx < _MIN_TOKENS_PER_CALL or n_chunks < 1:
        raise InvalidModel(f"calibration text has {len(ids)} tokens: at least one chunk of n_ctx={n_ctx} "
                           f"(>= {_MIN_TOKENS_PER_CALL}) tokens is needed")
    if threads:
        torch.set_num_threads(threads)
    from ..hf.streamed import streamed_model

    # proven to be the upload's weights (statistics of random parameters would mislead the
    # quantizer), each module's read just before it runs: one module resident, not the model
    with streamed_model(AutoModelForCausalLM, Path(model_dir)) as streamed:
        collector = _collect(streamed.model, ids, bos, gguf_arch=gguf_arch, n_blocks=n_blocks, n_ctx=n_ctx,
                             n_chunks=n_chunks, progress=progress)
    return _to_imatrix(collector, gguf_tensors, [dataset], n_chunks, n_ctx)


def _collect(model, ids: list[int], bos: int | None, *, gguf_arch: str, n_blocks: int, n_ctx: int, n_chunks: int,
             progress: Callable[[float, str], None] | None) -> _Collector:
    """The activation statistics of every block weight over the first `n_chunks` chunks."""
    torch = _torch()
    names = gguf_names_for([n for n, _ in _linear_modules(model)], gguf_arch, n_blocks)
    collector = _Collector()
    handles = [m.register_forward_pre_hook(collector.hook(names[n]))
               for n, m in _linear_modules(model) if names.get(n, "").startswith("blk.")]
    # several chunks per forward pass: each is its own sequence, so the sums are the same
    per_batch = max(1, _TOKENS_PER_BATCH // n_ctx)
    # the decoder without its output head: the head's weight is not collected, and its logits
    # (batch x n_ctx x vocabulary floats, 400 MB for SmolLM2's 49k) are not needed
    decoder = getattr(model, "base_model", model)
    try:
        with torch.no_grad():
            for c0 in range(0, n_chunks, per_batch):
                batch = [_chunk(ids, c, n_ctx, bos) for c in range(c0, min(c0 + per_batch, n_chunks))]
                decoder(input_ids=torch.tensor(batch), use_cache=False)
                if progress is not None:
                    done = c0 + len(batch)
                    progress(done / n_chunks, f"imatrix chunk {done}/{n_chunks}")
    finally:
        for h in handles:
            h.remove()
    return collector


def _to_imatrix(collector: _Collector, gguf_tensors, datasets, n_chunks, n_ctx) -> ImatrixData:
    sums, counts = {}, {}
    for name, acc in collector.sums.items():
        values = acc.numpy().astype(np.float32)
        if gguf_tensors is not None and (name not in gguf_tensors or gguf_tensors[name][0] != values.size):
            continue
        sums[name] = values.reshape(1, -1)
        counts[name] = np.array([collector.counts[name]], dtype=np.int64)
    if not sums:
        raise InvalidModel("no layer of the model could be matched to a GGUF tensor for the imatrix")
    return ImatrixData(sums, counts, datasets=list(datasets), chunk_count=n_chunks, chunk_size=n_ctx)


__all__ = ["ImatrixData", "load_imatrix", "compute_imatrix", "default_calibration_text", "gguf_names_for",
           "DEFAULT_DATASET", "DEFAULT_N_CTX"]
