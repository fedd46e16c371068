"""The size of a GGUF before it is written, from headers only.

A GGUF is: a 24-byte header, the KV pairs, one info record per tensor, padding to the alignment,
then each tensor's bytes padded to the alignment (gguf_output lays it out; gguf-py's writer does
the same). So the size is exact once we know each tensor's ggml type and shape and the KV bytes:

- types: llama.cpp's own policies (policy.tensor_type for convert_hf_to_gguf's float outputs,
  policy.plan_types for llama-quantize's mixtures and row fallbacks);
- bytes per tensor: gguf-py's GGML_QUANT_SIZES (block size, bytes per block);
- KV: what the writer would write, measured on an in-memory gguf.GGUFWriter. The vocabulary is
  the bulk of it; SentencePiece vocabularies are read the writer's own way (fast), but a
  byte-level BPE one would need transformers' AutoTokenizer (seconds, and the import alone), so
  its arrays are sized from tokenizer.json itself: the same token strings, one type per token,
  the same merges (gguf-py's SpecialVocab reads them from the JSON in both cases). Only a few
  small keys can differ (see _special_vocab): tens of bytes in a file of megabytes.

Nothing here reads tensor data.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf

from . import gguf_output as go
from .ggml_types import ALIGNMENT
from .policy import ModelInfo, TensorInfo, n_dims, plan_types
from .tensor_types import Overrides

_VT = gguf.GGUFValueType


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file to be written, as its info record and data section will hold it."""

    name: str
    n_dims: int  # dimensions in the info record
    type_name: str
    nbytes: int


def tensor_nbytes(type_name: str, ne: Sequence[int]) -> int:
    """Bytes of a tensor of ggml shape `ne` (row first) in `type_name` (gguf-py's block table)."""
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    n_rows = 1
    for d in ne[1:]:
        n_rows *= int(d)
    return int(ne[0]) // block * type_size * n_rows


def file_bytes(kv_bytes: int, tensors: Sequence[PlannedTensor], alignment: int = ALIGNMENT) -> int:
    """Size of a GGUF with `kv_bytes` of KV pairs and these tensors (the gguf_output layout)."""
    entries = [go.TensorEntry(t.name, (1,) * t.n_dims, 0, t.nbytes) for t in tensors]
    return go.pad(24 + kv_bytes + sum(go.info_size(e) for e in entries), alignment) + sum(
        go.pad(t.nbytes, alignment) for t in tensors)


def quantized_tensors(tensors: Sequence[TensorInfo], info: ModelInfo, quantization: str, *,
                      has_imatrix: bool, overrides: Overrides = ()) -> list[PlannedTensor]:
    """What llama-quantize writes for each input tensor: its mixture type (or the input type for
    tensors it copies), trailing 1-dims dropped as quantize_gguf drops them. `overrides`:
    --tensor-type pairs (tensor_types.parse_tensor_types)."""
    by_name = {t.name: t for t in tensors}
    out = []
    for c in plan_types(tensors, info, quantization, has_imatrix=has_imatrix, overrides=overrides):
        ne = by_name[c.name].ne
        out.append(PlannedTensor(c.name, n_dims(ne), c.type_name, tensor_nbytes(c.type_name, ne)))
    return out


# ---------------------------------------------------------------------------------------------
# KV bytes, measured on an in-memory gguf.GGUFWriter (no file: path None)

def _value_bytes(value, vtype: gguf.GGUFValueType, sub_type: gguf.GGUFValueType | None) -> int:
    """Bytes of one value as GGUFWriter._pack_val packs it (without its leading type)."""
    fmt = gguf.GGUFWriter._simple_value_packing.get(vtype)
    if fmt is not None:
        return struct.calcsize("<" + fmt)
    if vtype == _VT.STRING:
        return 8 + len(value.encode("utf-8") if isinstance(value, str) else value)
    if vtype != _VT.ARRAY:
        raise ValueError(f"unknown GGUF value type {vtype!r}")
    items = list(value)
    if sub_type is None:
        sub_type = _VT.UINT8 if isinstance(value, bytes) else _VT.get_type(items[0])
    head = 4 + 8  # item type, count
    fmt = gguf.GGUFWriter._simple_value_packing.get(sub_type)
    if fmt is not None:  # fixed-size items: no per-item work for a 262k-entry array
        return head + struct.calcsize("<" + fmt) * len(items)
    if sub_type == _VT.STRING:  # token lists and merges: a length prefix and the UTF-8 bytes
        return head + sum(8 + len(v.encode("utf-8") if isinstance(v, str) else v) for v in items)
    return head + sum(_value_bytes(v, sub_type, None) for v in items)


def kv_bytes(writer: gguf.GGUFWriter) -> int:
    """Bytes write_kv_data_to_file would write for `writer`'s KV pairs (key, type, value)."""
    return sum(8 + len(key.encode("utf-8")) + 4 + _value_bytes(v.value, v.type, v.sub_type)
               for key, v in writer.kv_data[0].items())


def kv_fields(writer: gguf.GGUFWriter) -> dict[str, object]:
    """`{key: python value}` of a writer's KV (what ModelInfo.from_fields reads)."""
    return {key: v.value for key, v in writer.kv_data[0].items()}


# ---------------------------------------------------------------------------------------------
# the vocabulary, without transformers

def _uses_sentencepiece(root: Path, style: str) -> bool:
    """Will vocab.write_vocab read tokenizer.model (fast, exact: call it) for this family?"""
    from .vocab import tokenizer_config

    if not (root / "tokenizer.model").is_file():
        return False
    if style == "phi3":
        return tokenizer_config(root).get("tokenizer_class") != "GPT2Tokenizer"
    return style in ("llama", "gemma", "gemma3", "qwen2")


def _json_tokens(tok_json: dict, n_vocab: int | None) -> list[str]:
    """Token strings by id from tokenizer.json (model.vocab + added_tokens), holes as [PADi]:
    what bpe_vocab gets from AutoTokenizer's get_vocab for the same file."""
    vocab = tok_json.get("model", {}).get("vocab") or {}
    by_id = {i: t for t, i in vocab.items()} if isinstance(vocab, dict) else {}
    by_id.update({t["id"]: t["content"] for t in tok_json.get("added_tokens", [])})
    n = n_vocab or (max(by_id) + 1 if by_id else 0)
    return [by_id.get(i, f"[PAD{i}]") for i in range(n)]


def estimate_vocab(w: gguf.GGUFWriter, root: Path, n_vocab: int | None, style: str = "llama"):
    """Write tokenizer.ggml.* into `w` as vocab.write_vocab would, for measuring: exactly for
    SentencePiece sources, from tokenizer.json for the rest (token texts of added tokens that
    transformers would re-normalise may differ by a few bytes; the pre-tokenizer name is
    guessed from its structure only)."""
    from . import vocab as v

    root = Path(root)
    if _uses_sentencepiece(root, style):
        return v.write_vocab(w, root, n_vocab, style)
    tok_json = v._read_json(root / "tokenizer.json")
    v.check_token_ids(tok_json, n_vocab)
    if style == "llama" and (add_prefix := v.tokenizer_config(root).get("add_prefix_space")) is not None:
        w.add_add_space_prefix(add_prefix)
    if style == "llama" and v._is_spm_style_json(tok_json):  # gguf's LlamaHfVocab: its own count
        tokens = _json_tokens(tok_json, None)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_types([0] * len(tokens))
        _special_vocab(w, root, n_vocab=len(tokens))
        return v.VocabInfo("llama", "default", len(tokens), "estimate")
    tokens = _json_tokens(tok_json, n_vocab)
    pre = v.pre_tokenizer_from_structure(tok_json) or "gpt-2"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([0] * len(tokens))
    _special_vocab(w, root, load_merges=True)
    return v.VocabInfo("gpt2", pre, len(tokens), "estimate")


def _special_vocab(w: gguf.GGUFWriter, root: Path, *, n_vocab: int | None = None, load_merges: bool = False) -> None:
    """The special-token keys (ids, add_bos/eos, chat template, merges) from gguf-py's
    SpecialVocab, which reads JSON files only. vocab.py adjusts a few add_*/normalizer flags
    on top (llama.cpp parity): bool keys of ~40 bytes each, not mirrored here."""
    from .vocab import special_vocab

    special_vocab(root, load_merges=load_merges, n_vocab=n_vocab).add_to_gguf(w, quiet=True)


def imatrix_kv_bytes() -> int:
    """The quantize.imatrix.* keys quantize_gguf adds with an imatrix we computed (file name,
    dataset, entries and chunks counts; their exact values are known only once it exists)."""
    from .imatrix import DEFAULT_DATASET

    return sum(len(b) for b in (
        go.encode_kv("quantize.imatrix.file", go.STRING, "imatrix.gguf"),
        go.encode_kv("quantize.imatrix.dataset", go.STRING, DEFAULT_DATASET),
        go.encode_kv("quantize.imatrix.entries_count", go.UINT32, 0),
        go.encode_kv("quantize.imatrix.chunks_count", go.UINT32, 0)))


__all__ = ["PlannedTensor", "tensor_nbytes", "file_bytes", "quantized_tensors", "kv_bytes", "kv_fields",
           "estimate_vocab", "imatrix_kv_bytes"]
