"""The source model's own outputs on the probe text: the oracle every GGUF target is held to.

Computed once per source (transformers, float32, eager attention, every weight proven to be the
upload's) and stored beside the lossless intermediate, like llama.cpp's `--kl-divergence-base`
file, so each target's validation reads them instead of running the source model again.

The file is a safetensors file (no pickle): tensors `logits` (F32 [n_tokens, n_vocab]) and
`token_ids` (I64 [n_tokens]), the probe text and a format tag in its metadata. It travels through
object storage, so `load` treats it as hostile: the strict header parser, every size capped, the
shapes consistent, the logits finite, the ids inside the vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidModel
from ..hf.safetensors_header import read_safetensors_header
from ..hf.sanity import SIZE_FIELDS
from ..hf.tokenizer_cache import shared_tokenizer

FORMAT = "quantyard.reference/1"
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A llama lives in high mountains, "
    "eats grass and weighs 130 kg; quantization maps weights to small integers: 3.14 + 42 = 45.14!"
)
MAX_TOKENS = 4096
MAX_VOCAB = SIZE_FIELDS["vocab_size"][1]
MAX_TEXT_BYTES = 256 * 1024
# 4096 tokens of a 262k vocabulary is 4.3 GB: far past any probe (40 tokens: 42 MB)
MAX_LOGITS_BYTES = 1 << 30
_TENSORS = {"logits": ("F32", 2), "token_ids": ("I64", 1)}

Progress = Callable[[float, str], None]


@dataclass(frozen=True, eq=False)
class ReferenceOutputs:
    """What transformers computes on the source for `text`: its token ids and float32 logits
    (one row per token). The logits are kept read-only: one object is shared by many targets."""

    text: str
    token_ids: tuple[int, ...]
    logits: np.ndarray

    def __post_init__(self) -> None:
        logits = np.array(self.logits, dtype=np.float32, copy=True)
        if logits.ndim != 2 or logits.shape[0] != len(self.token_ids):
            raise ValueError(f"logits of shape {logits.shape} for {len(self.token_ids)} tokens")
        logits.flags.writeable = False
        object.__setattr__(self, "token_ids", tuple(int(i) for i in self.token_ids))
        object.__setattr__(self, "logits", logits)

    @property
    def n_vocab(self) -> int:
        return int(self.logits.shape[1])

    def save(self, path: Path) -> None:
        """Write atomically (a reader never sees half a file)."""
        from safetensors.numpy import save_file

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"logits": np.ascontiguousarray(self.logits),
                   "token_ids": np.asarray(self.token_ids, dtype="<i8")},
                  str(tmp), metadata={"format": FORMAT, "text": self.text})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ReferenceOutputs:
        """Read a file written by `save`; InvalidModel saying what is wrong with any other."""
        path = Path(path)
        refs, meta = read_safetensors_header(path)  # InvalidModel on any malformed header
        if meta.get("format") != FORMAT:
            raise _bad(path, f"format is {str(meta.get('format'))[:40]!r}, not {FORMAT!r}")
        text = meta.get("text")
        if not isinstance(text, str) or len(text.encode("utf-8")) > MAX_TEXT_BYTES:
            raise _bad(path, f"the probe text is missing or longer than {MAX_TEXT_BYTES} bytes")
        if set(refs) != set(_TENSORS):
            raise _bad(path, f"holds tensors {sorted(refs)[:5]}, expected {sorted(_TENSORS)}")
        for name, (dtype, ndim) in _TENSORS.items():
            if refs[name].dtype != dtype or len(refs[name].shape) != ndim:
                raise _bad(path, f"{name} is {refs[name].dtype}{list(refs[name].shape)}, expected a "
                           f"{ndim}-d {dtype} tensor")
        n_tokens, n_vocab = refs["logits"].shape
        if refs["token_ids"].shape != (n_tokens,):
            raise _bad(path, f"{refs['token_ids'].shape[0]} token ids for {n_tokens} rows of logits")
        if not 0 < n_tokens <= MAX_TOKENS or not 0 < n_vocab <= MAX_VOCAB \
                or refs["logits"].nbytes > MAX_LOGITS_BYTES:
            raise _bad(path, f"logits of shape [{n_tokens}, {n_vocab}] are out of bounds (at most "
                       f"{MAX_TOKENS} tokens, {MAX_VOCAB} vocabulary, {MAX_LOGITS_BYTES >> 20} MiB)")
        ids = _read(refs["token_ids"], "<i8")
        if ids.min() < 0 or ids.max() >= n_vocab:
            raise _bad(path, f"a token id is outside the vocabulary of {n_vocab}")
        logits = _read(refs["logits"], "<f4")
        if not np.isfinite(logits).all():
            raise _bad(path, "the logits hold NaN or infinity")
        return cls(text=text, token_ids=tuple(ids.tolist()), logits=logits)


def _bad(path: Path, what: str) -> InvalidModel:
    return InvalidModel(f"reference outputs {path.name}: {what}", details={"file": path.name})


def _read(ref, dtype: str) -> np.ndarray:
    raw = np.memmap(ref.file, dtype=dtype, mode="r", offset=ref.offset, shape=ref.shape)
    try:
        return np.array(raw)
    finally:
        del raw


def compute_reference(source_dir: Path, *, text: str = PROBE_TEXT,
                      progress: Progress | None = None) -> ReferenceOutputs:
    """Tokenize `text` with the source's tokenizer and run the source model on it in float32
    with eager attention (soft-capping, sliding windows and scaling exactly as the model defines
    them; SDPA kernels skip some of it for some families).

    In bounded memory: the weights stay in the safetensors files and each module's are read
    just before it runs (hf.streamed), every one proven to be the upload's (a reference with
    random parameters would validate anything)."""
    from transformers import AutoModelForCausalLM

    from ..hf.streamed import streamed_model

    with shared_tokenizer(Path(source_dir)) as tok:
        ids = list(tok(text).input_ids)
    if not 0 < len(ids) <= MAX_TOKENS:
        raise ValueError(f"the probe text is {len(ids)} tokens (1 to {MAX_TOKENS} allowed)")
    with streamed_model(AutoModelForCausalLM, Path(source_dir), attn_implementation="eager",
                        progress=progress) as model:
        logits = model.forward(ids)
    return ReferenceOutputs(text=text, token_ids=tuple(ids), logits=logits)


__all__ = ["FORMAT", "PROBE_TEXT", "ReferenceOutputs", "compute_reference"]
