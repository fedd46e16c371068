"""Load a transformers model from an upload and prove it is the upload's model.

transformers fills every parameter a checkpoint lacks with its own random initialisation and
drops tensors it does not expect (a log line at most). A config naming one architecture over
another's tensors therefore loads "fine", and a validation against that model proves nothing
(measured: LlamaForCausalLM over GPT-2 tensors exported to onnx:fp32 and passed). Every engine
load of a source model goes through here and is checked three ways:

1. transformers' own report (`output_loading_info`): missing, unexpected and mismatched keys and
   error messages must all be empty, up to the allowed differences below;
2. independently of it, the tensor names in the files (safetensors headers, or the state dict
   of a weights-only pickle) against the model's state_dict: every source tensor lands on a
   model tensor, every parameter and persistent buffer has a source tensor or shares its
   storage with one that has (tied weights);
3. the values: every source tensor is finite (NaN/Inf refused naming it) and equals the model
   tensor it landed on (cast to the model's dtype), so nothing random and no discarded copy
   (e.g. an lm_head that differs from the embedding it is tied to) survives.

The only differences allowed (anything else is InvalidModel naming the file and tensors):
- buffers the model recomputes from its config (RECOMPUTED_BUFFERS): rotary `inv_freq`,
  `position_ids`, `token_type_ids`, GPT-2's causal masks `attn.bias` / `attn.masked_bias`; old
  checkpoints carry them, new models do not store them (or the other way round);
- tied weights: a model tensor that shares storage with one loaded from the source;
- the base-model prefix (`bert.encoder...` loaded into BertModel, or `encoder...` into a model
  whose state_dict says `bert.encoder...`) and LayerNorm's legacy `gamma` / `beta` names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import InvalidModel
from .safetensors_header import TensorRef

# Suffixes (after a dot, or the whole name) of buffers a model recomputes from its config.
RECOMPUTED_BUFFERS = ("inv_freq", "position_ids", "token_type_ids", "attn.bias", "attn.masked_bias",
                      "attention.bias", "attention.masked_bias", "crossattention.bias",
                      "crossattention.masked_bias")
_SHOW = 5  # tensor names quoted in a message
_INT_DTYPES = {"I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?", "F64": "<f8"}

Loader = Callable[[], "object"]  # () -> torch.Tensor or numpy array of one source tensor


def is_recomputed(name: str) -> bool:
    """True for a buffer the model derives from its config (never read from the checkpoint)."""
    return any(name == s or name.endswith("." + s) for s in RECOMPUTED_BUFFERS)


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def _refuse(file: str, what: str, names: Iterable[str], reason: str) -> InvalidModel:
    names = sorted(names)
    return InvalidModel(f"{file}: {what}: {_names(names)}",
                        details={"file": file, "reason": reason, "tensors": names[:_SHOW], "count": len(names)})


def _file_label(refs: Iterable[TensorRef]) -> str:
    files = sorted({r.file.name for r in refs})
    return ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")


def source_tensors(root: Path) -> dict[str, TensorRef]:
    """Every tensor of the safetensors files of `root` (single file or index), from headers."""
    from .source import _collect_tensors, _shard_map

    return _collect_tensors(Path(root), _shard_map(Path(root)))


def _candidates(name: str, prefix: str) -> list[str]:
    out = [name]
    if prefix:
        out += [f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
    for c in list(out):
        if c.endswith(".gamma"):
            out.append(c[: -len("gamma")] + "weight")
        elif c.endswith(".beta"):
            out.append(c[: -len("beta")] + "bias")
    return out


def match_names(source: Iterable[str], model_keys: Iterable[str], prefix: str) -> dict[str, str]:
    """source tensor name -> the model state_dict key it loads into (allowed renames only)."""
    own = set(model_keys)
    found = {}
    for name in source:
        key = next((c for c in _candidates(name, prefix) if c in own), None)
        if key is not None:
            found[name] = key
    return found


def _storage_id(t) -> tuple:
    """Equal for tensors that share storage. Meta tensors have no storage (every data_ptr is 0):
    there a tie is the same Parameter object, which is how transformers ties weights."""
    if t.is_meta or not t.numel():
        return ("object", id(t))
    return (t.data_ptr(), tuple(t.shape), t.dtype)


def check_names(model, source: Iterable[str], file: str) -> dict[str, str]:
    """Every source tensor used, every parameter / persistent buffer from the source (or tied
    to one that is); returns source name -> model key. InvalidModel naming the tensors."""
    state = model.state_dict(keep_vars=True)  # the objects themselves: see _storage_id
    prefix = getattr(model, "base_model_prefix", "") or ""
    source = list(source)
    matched = match_names(source, state, prefix)
    unused = [n for n in source if n not in matched and not is_recomputed(n)]
    if unused:
        raise _refuse(file, f"tensors that {type(model).__name__} (config.json) has no place for", unused,
                      "unused_tensors")
    loaded = {_storage_id(state[k]) for k in matched.values()}
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    missing = [k for k, t in state.items() if k not in matched.values() and _storage_id(t) not in loaded
               and (k in params or not is_recomputed(k))]
    if missing:
        raise _refuse(file, f"{type(model).__name__} (config.json) needs tensors the upload does not have "
                      "(they would be random)", missing, "missing_tensors")
    return matched


def check_values(model, loaders: Mapping[str, Loader], matched: Mapping[str, str], file: str) -> None:
    """Each source tensor finite and equal to the model tensor it loaded into."""
    import torch

    state = model.state_dict()
    for name, key in sorted(matched.items()):
        if is_recomputed(key):
            continue
        src = loaders[name]()
        src = torch.from_numpy(np.asarray(src)) if not isinstance(src, torch.Tensor) else src
        if src.is_floating_point() and not bool(torch.isfinite(src).all()):
            raise _refuse(file, "tensor holds NaN or infinity", [name], "non_finite")
        dst = state[key]
        if tuple(src.shape) != tuple(dst.shape) or not torch.equal(src.to(dst.dtype), dst):
            raise _refuse(file, "the loaded model's tensor differs from the upload's (tied to another tensor "
                          "with other values, or changed on load)", [name], "tensor_mismatch")
        del src


def _reader(ref: TensorRef) -> Loader:
    from .tensor_reader import read_f32

    if ref.dtype in _INT_DTYPES:
        return lambda: np.array(np.memmap(ref.file, dtype=_INT_DTYPES[ref.dtype], mode="r", offset=ref.offset,
                                          shape=ref.shape)) if ref.nbytes else np.zeros(ref.shape)
    return lambda: read_f32(ref)


def check_report(info: Mapping, file: str, model_name: str) -> None:
    """transformers' loading report, with the allowed differences taken out."""
    mismatched = [m[0] if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or ()]
    if mismatched:
        raise _refuse(file, f"tensors whose shape does not fit {model_name} (config.json)", mismatched,
                      "mismatched_tensors")
    unexpected = [k for k in info.get("unexpected_keys") or () if not is_recomputed(k)]
    if unexpected:
        raise _refuse(file, f"tensors that {model_name} (config.json) has no place for", unexpected,
                      "unused_tensors")
    missing = [k for k in info.get("missing_keys") or () if not is_recomputed(k)]
    if missing:
        raise _refuse(file, f"{model_name} (config.json) needs tensors the upload does not have "
                      "(they would be random)", missing, "missing_tensors")
    if info.get("error_msgs"):
        raise InvalidModel(f"{file}: the weights do not load into {model_name} (config.json)",
                           details={"file": file, "reason": "load_errors", "count": len(info["error_msgs"])})


_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+)")


def _load_error(e: Exception, file: str, model_name: str) -> InvalidModel:
    """A transformers load failure as InvalidModel, without its text (it can hold paths)."""
    names = _SIZE_MISMATCH.findall(str(e))
    if names:
        return _refuse(file, f"tensors whose shape does not fit {model_name} (config.json)", names,
                       "mismatched_tensors")
    return InvalidModel(f"{file}: the weights do not load into {model_name} as config.json describes it "
                        f"({type(e).__name__})", details={"file": file, "reason": "load_error"})


def load_pretrained(cls, root: Path, *, dtype: str = "float32", attn_implementation: str | None = None):
    """`cls.from_pretrained(root)` from safetensors only, proven to hold exactly the upload's
    tensors (module docstring); the model in eval mode. `cls` is a transformers class or an
    Auto* class."""
    import torch
    from safetensors import SafetensorError

    refs = source_tensors(root)
    file = _file_label(refs.values())
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        # ignore_mismatched_sizes: transformers then reports the mismatched tensors by name
        # (its error would not name them) and check_report refuses them
        model, info = cls.from_pretrained(Path(root), use_safetensors=True, dtype=getattr(torch, dtype),
                                          output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise _load_error(e, file, getattr(cls, "__name__", "the model")) from None
    name = type(model).__name__
    check_report(info, file, name)
    matched = check_names(model, refs, file)
    check_values(model, {n: _reader(r) for n, r in refs.items()}, matched, file)
    return model.eval()


def _given(tensor: object) -> Loader:
    return lambda: tensor


def load_state_dict_strict(model, state: Mapping[str, object], file: str):
    """Load a weights-only pickle's tensors into a freshly built `model`, with the same proof
    as load_pretrained (names both ways, values, finiteness); the model in eval mode."""
    matched = check_names(model, state, file)
    own = {key: state[name] for name, key in matched.items() if not is_recomputed(key)}
    try:
        model.load_state_dict(own, strict=False)
    except RuntimeError as e:
        raise _load_error(e, file, type(model).__name__) from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    check_values(model, {n: _given(t) for n, t in state.items()}, matched, file)
    return model.eval()


__all__ = ["RECOMPUTED_BUFFERS", "check_names", "check_report", "check_values", "is_recomputed",
           "load_pretrained", "load_state_dict_strict", "match_names", "source_tensors"]
