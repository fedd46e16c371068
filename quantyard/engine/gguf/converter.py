"""Hugging Face safetensors -> GGUF: plan the tensors, write them streaming, validate, publish.

The file is written under a hidden temporary name in out_dir, validated there, and only renamed
to its final name once every check passed; any exception (Cancelled included) removes it.

Metadata: every key convert_hf_to_gguf.py (llama.cpp's tree, with its own gguf-py) writes, with
the same value and type (tests/engine/test_metadata_parity.py compares them), plus our provenance:
- always `general.quantized_by` = "Quantyard" and `quantyard.engine_version`;
- `quantyard.<key>` for each non-empty provenance entry not listed below (source_sha256, recipe_hash, ...);
- the provenance entries name, source_url, source_repo_url and base_model(+_url) set
  general.name, general.source.url, general.source.repo_url and general.base_model.0.* instead
  of what llama.cpp derives from the folder (name: as its --model-name does; without one,
  general.name is llama.cpp's own derivation, and only the file name falls back to model_name()).
QUANTYARD_KV / provenance_kv() are that list in code (stages.quantize writes the same keys),
is_provenance_key() recognises it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import gguf
import numpy as np

from ..errors import InvalidModel, ResourceExhausted
from ..hf.source import HFModelSource
from ..hf.tensor_reader import read_f32
from ..manifest import ENGINE_VERSION
from ..results import ConversionResult
from ..spec import TargetSpec
from . import archs, policy
from . import estimate as est
from .archs import Architecture, tensor_order_key
from .ggml_types import ALIGNMENT, FILE_TYPES, QUANTIZATION_VERSION
from .validate import validate_gguf
from .vocab import RecordedVocab, VocabInfo, gguf_vocab_size, record_vocab, write_vocab
from .writer import GGUFOutput, TensorPlan, write_ggufs

Progress = Callable[[float, str], None]
# Share of the progress bar spent writing; validation (two model loads) takes the rest.
_WRITE_SHARE = 0.8
FLOAT_OUTTYPES = ("F32", "F16", "BF16")


def architecture(source: HFModelSource) -> Architecture:
    """The architecture family of `source`; UnsupportedArchitecture naming the supported set."""
    n_vocab = source.config.get("vocab_size") or (source.config.get("text_config") or {}).get("vocab_size")
    return archs.for_config(source.config, tokenizer_vocab_size=gguf_vocab_size(source.root, n_vocab))


def _finite(data: np.ndarray, hf_name: str, file: str) -> np.ndarray:
    """`data` unless it holds NaN or infinity: one vectorised pass per tensor, measured 0.04 s
    for all of SmolLM2-135M against 1.6 s to write it as BF16 (tests/engine/test_strict_load.py)."""
    if not np.isfinite(data).all():
        raise InvalidModel(f"{file}: tensor {hf_name} holds NaN or infinity",
                           details={"file": file, "tensor": hf_name, "reason": "non_finite"})
    return data


def _unplaceable(arch: Architecture, source: HFModelSource, names: list[str]) -> InvalidModel:
    files = sorted({source.tensors[n].file.name for n in names})
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return InvalidModel(f"{', '.join(files)}: tensors with no place in a {arch.name} model "
                        f"({arch.config.get('architectures', ['?'])[0]} in config.json): {', '.join(names[:5])}{more}",
                        details={"file": files[0], "reason": "unused_tensors", "tensors": names[:5],
                                 "count": len(names)})


def plan_tensors(source: HFModelSource, quantization: str, arch: Architecture | None = None) -> list[TensorPlan]:
    """Every output tensor, in a stable order independent of how the source is sharded.

    Every source tensor is written or skipped for a stated reason (archs.base.SKIPPED, the
    family's dropped_tensors); any other is InvalidModel naming it, as is a tensor llama.cpp
    needs that the source lacks. Each tensor is checked finite as it streams."""
    arch = arch or architecture(source)
    plans: list[TensorPlan] = []
    seen: dict[str, str] = {}  # GGUF name -> the HF name mapped to it
    unplaceable: list[str] = []
    for hf_name, ref in sorted(source.tensors.items()):
        try:
            name = arch.gguf_name(hf_name)
        except InvalidModel:
            unplaceable.append(hf_name)
            continue
        if name is None:
            continue
        if name in seen:
            raise InvalidModel(f"tensors {seen[name]!r} and {hf_name!r} both map to {name}")
        seen[name] = hf_name

        def load(ref=ref, hf_name=hf_name):
            return arch.transform(hf_name, _finite(read_f32(ref), hf_name, ref.file.name))

        shape = arch.output_shape(hf_name, ref.shape)
        plans.append(TensorPlan(name, shape, policy.tensor_type(name, shape, quantization), load, hf_name))
    if unplaceable:
        raise _unplaceable(arch, source, unplaceable)
    arch.check_complete(set(seen), ", ".join(sorted({r.file.name for r in source.tensors.values()})))
    for name, data in arch.extra_tensors():
        plans.append(TensorPlan(name, data.shape, policy.tensor_type(name, data.shape, quantization),
                                _constant(data)))
    return sorted(plans, key=lambda p: tensor_order_key(p.name))


def _constant(data: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: data


def model_name(source: HFModelSource, provenance: Mapping[str, str]) -> str:
    return str(provenance.get("name") or source.config.get("_name_or_path") or source.name).rsplit("/", 1)[-1]


def output_filename(name: str, quantization: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return f"{safe}-{quantization}.gguf"


# provenance keys that become general.* keys (the rest become quantyard.<key>)
_GENERAL_PROVENANCE = ("name", "source_url", "source_repo_url", "base_model", "base_model_url")
# keys we write that convert_hf_to_gguf.py never does, with their values (see the module docstring)
QUANTYARD_KV = {"general.quantized_by": "Quantyard", "quantyard.engine_version": ENGINE_VERSION}
QUANTYARD_KEYS = tuple(QUANTYARD_KV)
QUANTYARD_PREFIX = "quantyard."


def is_provenance_key(key: str) -> bool:
    """A key Quantyard adds to what llama.cpp's converter writes: its own, never one of llama.cpp's."""
    return key in QUANTYARD_KEYS or key.startswith(QUANTYARD_PREFIX)


def provenance_kv(provenance: Mapping[str, str]) -> dict[str, str]:
    """Every key we add to llama.cpp's: QUANTYARD_KV, then quantyard.<key> for each provenance
    entry that is neither empty nor one of those that set general.* keys."""
    kv = dict(QUANTYARD_KV)
    for key, value in sorted(provenance.items()):
        if key not in _GENERAL_PROVENANCE and value:
            kv[f"{QUANTYARD_PREFIX}{re.sub(r'[^a-z0-9_]', '_', key.lower())}"] = str(value)
    return kv


def _base_model_entry(ref: str, url: str | None) -> dict:
    """"org/name" or a Hugging Face URL -> a general.base_model.0.* entry."""
    m = re.match(r"^(?:https?://huggingface\.co/)?([^/\s]+)/([^/\s]+?)/?$", ref)
    if m:
        org, name = m.groups()
        return {"name": name, "organization": org, "repo_url": url or f"https://huggingface.co/{org}/{name}"}
    return {"name": ref, **({"repo_url": url} if url else {})}


def general_metadata(source: HFModelSource, provenance: Mapping[str, str], total_params: int) -> gguf.Metadata:
    """general.* as convert_hf_to_gguf derives it (model card, config, generation config, folder
    name heuristics; gguf-py's Metadata; the folder's name when nothing names the model), the
    provenance name standing for its --model-name, then the provenance we were given."""
    meta = gguf.Metadata.load(None, source.root, str(provenance.get("name") or "") or None, total_params)
    if meta.name is None:
        meta.name = source.root.name
    meta.quantized_by = QUANTYARD_KV["general.quantized_by"]
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, 0, 0, 0)
    if provenance.get("source_url"):
        meta.source_url = str(provenance["source_url"])
    if provenance.get("source_repo_url"):
        meta.source_repo_url = str(provenance["source_repo_url"])
    if provenance.get("base_model"):
        meta.base_models = [_base_model_entry(str(provenance["base_model"]), provenance.get("base_model_url"))]
    return meta


def _metadata_writer(source: HFModelSource, arch: Architecture, quantization: str,
                     provenance: Mapping[str, str], total_params: int, vocab_out: list,
                     vocab: Callable[..., VocabInfo] = write_vocab):
    """`vocab` writes tokenizer.ggml.* (estimate.estimate_vocab when only measuring)."""

    def add(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        general_metadata(source, provenance, total_params).set_gguf_meta_model(w)
        arch.hparams().write(w)
        w.add_file_type(FILE_TYPES[quantization].llama_ftype)
        w.add_quantization_version(QUANTIZATION_VERSION)
        n_vocab = arch.config.get("vocab_size")
        vocab_out.append(vocab(w, source.root, n_vocab, arch.vocab_style))
        for key, value in provenance_kv(provenance).items():
            if key.startswith(QUANTYARD_PREFIX):  # general.quantized_by went in with general.* above
                w.add_string(key, value)

    return add


# Measured metadata (KV bytes, KV values) per source folder state: the same for every target of a
# source (general.file_type is a u32 whatever its value), so a job's targets parse the tokenizer once.
_MEASURED: dict[tuple, tuple[int, dict[str, object]]] = {}


def _folder_state(source: HFModelSource) -> tuple:
    """The source folder's path and its non-weight files' names, sizes and mtimes: what the
    metadata is made of, so a changed tokenizer or config is never served from a cache."""
    weights = set(source.weight_files)
    files = sorted(f for f in source.root.iterdir() if f.is_file() and f not in weights)
    return (str(source.root.resolve()), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))


def _measured_metadata(source: HFModelSource, arch: Architecture, total_params: int) -> tuple[int, dict]:
    """The KV our writer gives `source`'s GGUFs, written to an in-memory GGUFWriter and sized."""
    key = (_folder_state(source), total_params)
    if key not in _MEASURED:
        w = gguf.GGUFWriter(None, arch.name)
        _metadata_writer(source, arch, "F32", {}, total_params, [], vocab=est.estimate_vocab)(w)
        while len(_MEASURED) >= 8:
            _MEASURED.pop(next(iter(_MEASURED)))
        _MEASURED[key] = (est.kv_bytes(w), est.kv_fields(w))
    return _MEASURED[key]


def estimate_file_size(source: HFModelSource, target: TargetSpec, arch: Architecture | None = None) -> int:
    """Bytes of the file `target` comes out as, from headers only (estimate.py). Float types
    are written straight from the source; the rest are llama-quantize's mixture applied to the
    lossless intermediate, whose metadata they keep. Unknown here, so left out: provenance
    keys and an imatrix the caller gives (tens of bytes)."""
    from ..stages import wants_imatrix
    from .auto_budget import AUTO
    from .tensor_types import parse_tensor_types

    arch = arch or architecture(source)
    quantization = target.quantization
    if quantization == AUTO:  # at most the largest preset it may pick, and never over its max_size
        from ..spec import TargetSpec, parse_size
        from .auto_budget import parse_auto_budget

        biggest = estimate_file_size(source, TargetSpec("gguf", "Q8_0"), arch)
        cap = parse_auto_budget(target.params, parse_size).max_size
        return biggest if cap is None else min(biggest, cap)
    direct = quantization in FLOAT_OUTTYPES
    dtype = source.source_dtype.upper()
    plans = plan_tensors(source, quantization if direct else (dtype if dtype in FLOAT_OUTTYPES else "F32"), arch)
    kv, fields = _measured_metadata(source, arch, sum(math.prod(p.shape) for p in plans))
    infos = [policy.TensorInfo(p.name, tuple(reversed(p.shape)), p.type_name) for p in plans]
    if direct:
        tensors = [est.PlannedTensor(t.name, len(t.ne), t.type_name, est.tensor_nbytes(t.type_name, t.ne))
                   for t in infos]
    else:
        imatrix = wants_imatrix(target)
        tensors = est.quantized_tensors(infos, policy.ModelInfo.from_fields(fields), quantization,
                                        has_imatrix=imatrix,
                                        overrides=parse_tensor_types(target.params.get("tensor_types")))
        kv += est.imatrix_kv_bytes() if imatrix else 0
    return est.file_bytes(kv, tensors, ALIGNMENT)


def estimate(source: HFModelSource, target: TargetSpec) -> dict[str, int]:
    """Output size (estimate_file_size) and peak memory, from shapes only."""
    arch = architecture(source)
    size = estimate_file_size(source, target, arch)
    vocab_bytes = max((f.stat().st_size for f in source.root.glob("tokenizer*") if f.is_file()), default=0)
    largest = max(t.n_elements for t in source.tensors.values()) * 4
    # writing: float32 copy + transformed copy + encoded bytes of the largest tensor;
    # validation: transformers in float32 plus llama.cpp's copy of the artifact, side by side.
    writing = 3 * largest + vocab_bytes
    validating = source.parameter_count * 4 + size
    return {"size_bytes": size, "peak_memory_bytes": max(writing, validating), "disk_bytes": size}


# The last source's recorded vocabulary: a job's float targets, intermediate and later calls for
# the same folder build it once (one entry: a 262k vocabulary is ~100 MB of Python objects).
_VOCAB: dict[tuple, RecordedVocab] = {}


def vocab_for(source: HFModelSource, arch: Architecture) -> RecordedVocab:
    """The source's vocabulary, recorded once for its folder's state (see _VOCAB)."""
    key = (_folder_state(source), arch.name, arch.config.get("vocab_size"), arch.vocab_style)
    if key not in _VOCAB:
        _VOCAB.clear()
        _VOCAB[key] = record_vocab(source.root, arch.config.get("vocab_size"), arch.vocab_style)
    return _VOCAB[key]


def _write(source: HFModelSource, arch: Architecture, files: Sequence[tuple[Path, str, list[TensorPlan]]],
           provenance: Mapping[str, str], on_tensor) -> VocabInfo:
    """Write every (path, outtype, plans) in one pass over the source's tensors."""
    vocab = vocab_for(source, arch)
    total_params = sum(math.prod(p.shape) for p in files[0][2])
    outputs = [GGUFOutput(path, _metadata_writer(source, arch, outtype, provenance, total_params, [],
                                                 vocab=vocab.write), plans)
               for path, outtype, plans in files]
    try:
        write_ggufs(arch.name, outputs, on_tensor)
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            raise ResourceExhausted(f"out of disk space writing {', '.join(p.name for p, _, _ in files)}") from e
        raise
    return vocab.info


def write_float_ggufs(source: HFModelSource, outputs: Sequence[tuple[Path, str]], *,
                      provenance: Mapping[str, str] | None = None,
                      progress: Progress | None = None) -> list[list[TensorPlan]]:
    """Several float GGUFs of `source` in ONE pass over it: e.g. the F16 target and the BF16
    lossless intermediate, `outputs=[(f16_path, "F16"), (inter_path, "BF16")]`. Each tensor is
    read once, encoded once per distinct type and appended to every file; each file is
    byte-identical to what write_float_gguf(source, path, outtype) writes alone. The vocabulary
    is built once. No validation here: the caller validates what it publishes. Returns each
    output's tensor plan (file order), in the order of `outputs`. On any error (Cancelled
    raised by `progress` included) every output file is removed."""
    files = [(Path(path), outtype) for path, outtype in outputs]
    for _, outtype in files:
        if outtype not in FLOAT_OUTTYPES:
            raise ValueError(f"outtype must be one of {', '.join(FLOAT_OUTTYPES)}, not {outtype!r}")
    if len({p.resolve() for p, _ in files}) != len(files):
        raise ValueError("write_float_ggufs: two outputs share a path")
    if not files:
        return []
    arch = architecture(source)
    plans = [plan_tensors(source, outtype, arch) for _, outtype in files]
    total = sum(p.nbytes for p in plans[0]) or 1
    done = 0

    def on_tensor(i: int, plan: TensorPlan) -> None:
        nonlocal done
        done += plan.nbytes
        _report(progress, done / total, f"wrote {plan.name} ({i + 1}/{len(plans[0])})")

    with _cleanup_on_error(*(p for p, _ in files)):
        _report(progress, 0.0, f"writing {', '.join(p.name for p, _ in files)}")
        _write(source, arch, [(p, t, pl) for (p, t), pl in zip(files, plans, strict=True)],
               dict(provenance or {}), on_tensor)
    return plans


def write_float_gguf(source: HFModelSource, out_path: Path, outtype: str = "F32", *,
                     provenance: Mapping[str, str] | None = None,
                     progress: Progress | None = None) -> list[TensorPlan]:
    """Write the lossless (or float-rounded) intermediate GGUF of `source` to `out_path`, exactly
    as convert_hf_to_gguf.py --outtype f32/f16/bf16 lays it out (1-D tensors and norms stay F32).
    No validation here: the caller validates what it finally publishes. Returns the tensor plan
    (names, shapes, types, source names) in file order. On any error the file is removed.
    Several float files of one source: write_float_ggufs (one read of the source for all)."""
    return write_float_ggufs(source, [(out_path, outtype)], provenance=provenance, progress=progress)[0]


@contextlib.contextmanager
def _cleanup_on_error(*paths: Path):
    try:
        yield
    except BaseException:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise


def _report(progress: Progress | None, frac: float, message: str) -> None:
    if progress is not None:
        progress(min(max(frac, 0.0), 1.0), message)


def convert(source: HFModelSource, target: TargetSpec, out_dir: Path, *, progress: Progress | None = None,
            provenance: Mapping[str, str] | None = None, stem: str | None = None) -> ConversionResult:
    """One validated float GGUF; named `stem`-QUANT.gguf (default: model_name)."""
    provenance = dict(provenance or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / output_filename(stem or model_name(source, provenance), target.quantization)
    tmp = out_dir / f".{final.name}.{uuid.uuid4().hex}.partial"
    arch = architecture(source)
    plans = plan_tensors(source, target.quantization, arch)
    total_bytes = sum(p.nbytes for p in plans) or 1

    with _cleanup_on_error(tmp):
        _report(progress, 0.0, f"writing {final.name}")
        done = 0

        def on_tensor(i: int, plan: TensorPlan) -> None:
            nonlocal done
            done += plan.nbytes
            _report(progress, _WRITE_SHARE * done / total_bytes, f"wrote {plan.name} ({i + 1}/{len(plans)})")

        vocab = _write(source, arch, [(tmp, target.quantization, plans)], provenance, on_tensor)
        _report(progress, _WRITE_SHARE, "validating with llama.cpp and transformers")
        metrics = validate_gguf(tmp, source.root, target.quantization, expected_tensors=len(plans))
        _report(progress, 0.99, "validated")
        os.replace(tmp, final)
    return float_result(final, target, source, arch, plans, metrics, vocab)


def float_result(path: Path, target: TargetSpec, source: HFModelSource, arch: Architecture,
            plans: list[TensorPlan], metrics: dict, vocab: VocabInfo) -> ConversionResult:
    """The ConversionResult of a written float GGUF: its metadata from the plans and vocabulary."""
    types: dict[str, int] = {}
    for p in plans:
        types[p.type_name] = types.get(p.type_name, 0) + 1
    metadata = {
        "architecture": source.architecture,
        "gguf_architecture": arch.name,
        "tokenizer_model": vocab.model,
        "tokenizer_pre": vocab.pre,
        "tensor_count": len(plans),
        "parameter_count": sum(math.prod(p.shape) for p in plans),
        "file_type": FILE_TYPES[target.quantization].llama_ftype,
        "source_dtype": source.source_dtype,
        "tensor_types": types,
        "filename": path.name,
    }
    return ConversionResult(path=path, format=target.format, quantization=target.quantization,
                            size_bytes=path.stat().st_size, metadata=metadata, metrics=metrics,
                            engine_version=ENGINE_VERSION)


class GGUFConverter:
    """The "gguf" entry of the engine's converter registry."""

    architectures = archs.ARCHITECTURES

    def estimate(self, source: HFModelSource, target: TargetSpec) -> dict[str, int]:
        return estimate(source, target)

    def convert(self, source: HFModelSource, target: TargetSpec, out_dir: Path, *,
                progress: Progress | None = None, provenance: Mapping[str, str] | None = None) -> ConversionResult:
        return convert(source, target, out_dir, progress=progress, provenance=provenance)


__all__ = ["GGUFConverter", "plan_tensors", "estimate", "convert", "output_filename", "write_float_gguf",
           "write_float_ggufs", "architecture", "general_metadata", "FLOAT_OUTTYPES", "estimate_file_size",
           "is_provenance_key", "provenance_kv", "model_name", "QUANTYARD_KEYS", "QUANTYARD_KV",
           "QUANTYARD_PREFIX"]
