"""A transformers model whose weights stay in the upload's safetensors files.

The model is built with every parameter on the meta device (no memory); each module's own
parameters are read from the files as float32 just before its forward and dropped right after
(forward pre/post hooks). A weight larger than ROW_BLOCK_BYTES in float32 is never whole in
memory: an nn.Linear (the output head of a large vocabulary) is applied block of output rows by
block, and an nn.Embedding keeps only the rows its input uses (every row is still read, block by
block, for the finiteness check). One forward of a causal LM therefore holds at most one
decoder module's weights besides the activations, whatever the model's size: the reference
outputs of an 8B model need well under 1 GB, not the ~45 GB of a float32 copy.

The guarantee of strict_load holds without loading anything up front: names both ways
(check_names: every source tensor has a place, every parameter a source tensor or a tie to one),
shapes from the headers, tied source tensors equal (an lm_head that differs from the embedding it
is tied to would be dropped silently), every tensor finite when it is read.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import InvalidModel
from .safetensors_header import FLOAT_DTYPES, TensorRef
from .strict_load import _file_label, _reader, _refuse, check_names, is_recomputed, source_tensors
from .tensor_reader import read_f32_rows

Progress = Callable[[float, str], None]
# A weight above this many float32 bytes is read and used by blocks of rows of about this size
# (a 262k-token output head is 1.2-2.7 GB in float32). Each output element of a linear layer is
# the same dot product whichever block of rows it is computed in.
ROW_BLOCK_BYTES = 32 << 20


_meta = threading.local()  # set in the one thread building a streamed model
_patch_lock = threading.Lock()
_patch_users = 0
_ORIGINAL_REGISTER: list = []  # torch's own register_parameter while the hook is installed


def _register_parameter(module, name, param):
    _ORIGINAL_REGISTER[0](module, name, param)
    if getattr(_meta, "active", False) and param is not None and not param.is_meta:
        module._parameters[name] = type(param)(param.to("meta"), requires_grad=False)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered in this thread inside lands on the meta device; buffers
    stay real (rotary inv_freq, Gemma's embedding scale: computed from the config in __init__,
    never stored). Modules create their parameters with torch.empty and initialise them after
    registering, so the random initialisation runs on meta tensors (nothing allocated, nothing
    computed). The hook is process-wide while any thread is inside, but acts only for the
    threads inside: another thread building a model meanwhile gets real parameters."""
    import torch

    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            _ORIGINAL_REGISTER[:] = [torch.nn.Module.register_parameter]
            torch.nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _patch_users += 1
    _meta.active = True
    try:
        yield
    finally:
        _meta.active = False
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                torch.nn.Module.register_parameter = _ORIGINAL_REGISTER[0]  # type: ignore[method-assign]


def _empty_model(cls, root: Path, attn_implementation: str | None):
    import torch
    from transformers import AutoConfig

    from .source import load_config

    load_config(root)  # size fields capped before transformers sizes anything from them
    config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with _parameters_on_meta():
        model = cls.from_config(config, dtype=torch.float32, **kwargs)
    return model.eval()


def _check_shapes(state, refs: dict[str, TensorRef], matched: dict[str, str], file: str) -> None:
    wrong = [n for n, k in matched.items() if not is_recomputed(k) and tuple(refs[n].shape) != tuple(state[k].shape)]
    if wrong:
        raise _refuse(file, "tensors whose shape does not fit the model config.json describes", wrong,
                      "mismatched_tensors")
    odd = [n for n, k in matched.items() if state[k].is_floating_point() and refs[n].dtype not in FLOAT_DTYPES]
    if odd:
        raise _refuse(file, "weights of a dtype that is not F32, F16 or BF16", odd, "unsupported_dtype")


def _read_checked(ref: TensorRef, file: str):
    import torch

    value = torch.from_numpy(np.asarray(_reader(ref)()))
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise _refuse(file, "tensor holds NaN or infinity", [ref.name], "non_finite")
    return value


def _block_rows(ref: TensorRef) -> int:
    return max(1, ROW_BLOCK_BYTES // max(1, 4 * int(np.prod(ref.shape[1:]))))


def _read_rows_checked(ref: TensorRef, start: int, stop: int, file: str):
    import torch

    value = torch.from_numpy(read_f32_rows(ref, start, stop))
    if not bool(torch.isfinite(value).all()):
        raise _refuse(file, "tensor holds NaN or infinity", [ref.name], "non_finite")
    return value


def _by_rows(module, ref: TensorRef) -> bool:
    """A large float weight of a plain nn.Linear, or of an nn.Embedding (a subclass that scales
    its output too) without max_norm: used block of rows by block (module docstring)."""
    import torch

    if ref.dtype not in FLOAT_DTYPES or len(ref.shape) != 2 or 4 * ref.n_elements <= ROW_BLOCK_BYTES:
        return False
    if isinstance(module, torch.nn.Linear):
        return type(module).forward is torch.nn.Linear.forward
    return isinstance(module, torch.nn.Embedding) and module.max_norm is None


def _check_ties(groups: dict[int, list[str]], refs: dict[str, TensorRef], file: str) -> None:
    """Source tensors that land on one (tied) parameter must be equal; read two at a time."""
    import torch

    for names in groups.values():
        if len(names) < 2:
            continue
        first = _read_checked(refs[names[0]], file)
        for other in names[1:]:
            if not torch.equal(first, _read_checked(refs[other], file)):
                raise _refuse(file, "tensors tied to one parameter hold different values (one would be "
                              "dropped)", [names[0], other], "tensor_mismatch")
        del first


class StreamedModel:
    """Owns the hooks; `forward(ids)` returns float32 logits [n_tokens, n_vocab]."""

    def __init__(self, model, sources: dict[int, TensorRef], file: str, progress: Progress | None) -> None:
        import torch

        self.model, self._sources, self._file, self._progress = model, sources, file, progress
        self._held: dict[int, dict[str, object]] = {}
        self._modules = [m for m in model.modules() if any(p is not None for p in m._parameters.values())]
        self._done = 0
        self.reads = 0  # tensors read from the files (tests count them)
        self._hooks = []
        self._by_rows: dict[int, TensorRef] = {}  # module -> its weight, used by blocks of rows
        self._padding: dict[int, int | None] = {}  # an embedding's padding_idx while it runs
        for m in self._modules:
            weight = m._parameters.get("weight")
            ref = sources.get(id(weight)) if weight is not None else None
            if ref is not None and _by_rows(m, ref):
                self._by_rows[id(m)] = ref
                if isinstance(m, torch.nn.Linear):
                    m.__dict__["forward"] = functools.partial(self._linear_by_rows, m)  # this instance only
            self._hooks.append(m.register_forward_pre_hook(self._materialise))
            self._hooks.append(m.register_forward_hook(self._release))

    def _materialise(self, module, args):
        import torch

        held = {}
        rows = self._by_rows.get(id(module))
        for name, param in module._parameters.items():
            if param is None or (rows is not None and name == "weight"):
                continue
            held[name] = param
            module._parameters[name] = torch.nn.Parameter(_read_checked(self._sources[id(param)], self._file),
                                                          requires_grad=False)
            self.reads += 1
        if rows is not None and isinstance(module, torch.nn.Embedding):
            held["weight"] = module._parameters["weight"]
            if args and isinstance(args[0], torch.Tensor):
                args = self._embedding_rows(module, rows, args)
            else:  # called with keywords: the whole weight (no hook sees keyword arguments)
                module._parameters["weight"] = torch.nn.Parameter(_read_checked(rows, self._file), requires_grad=False)
                self.reads += 1
        self._held[id(module)] = held
        self._done += 1
        if self._progress is not None:
            self._progress(self._done / len(self._modules), "reference: running the source model")
        return args

    def _embedding_rows(self, module, ref: TensorRef, args):
        """The rows the input ids use, as the module's weight, and the ids renumbered into them."""
        import torch

        (ids, *rest) = args
        wanted, position = torch.unique(ids, return_inverse=True)
        if wanted.numel() and (int(wanted.min()) < 0 or int(wanted.max()) >= ref.shape[0]):
            raise IndexError("index out of range in self")
        kept, step = [], _block_rows(ref)
        for start in range(0, ref.shape[0], step):
            block = _read_rows_checked(ref, start, min(start + step, ref.shape[0]), self._file)
            inside = wanted[(wanted >= start) & (wanted < start + step)]
            kept.append(block[inside - start].clone())
            del block
        self.reads += 1
        module._parameters["weight"] = torch.nn.Parameter(torch.cat(kept), requires_grad=False)
        # padding_idx only masks gradients, but must index the weight: not one of these rows
        self._padding[id(module)] = module.padding_idx
        module.padding_idx = None
        return (position, *rest)

    def _linear_by_rows(self, module, x):
        """nn.Linear's forward, its weight read and applied one block of output rows at a time."""
        import torch

        ref = self._by_rows[id(module)]
        bias = module.bias
        out = x.new_empty((*x.shape[:-1], ref.shape[0]))
        step = _block_rows(ref)
        for start in range(0, ref.shape[0], step):
            stop = min(start + step, ref.shape[0])
            weight = _read_rows_checked(ref, start, stop, self._file)
            out[..., start:stop] = torch.nn.functional.linear(x, weight, None if bias is None else bias[start:stop])
            del weight
        self.reads += 1
        return out

    def _release(self, module, _args, _output) -> None:
        module._parameters.update(self._held.pop(id(module)))
        if id(module) in self._padding:
            module.padding_idx = self._padding.pop(id(module))

    def forward(self, ids: list[int]) -> np.ndarray:
        import torch

        self._done = 0
        with torch.no_grad():
            out = self.model(torch.tensor([ids]), use_cache=False)
        return out.logits[0].float().numpy()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for m in self._modules:
            m.__dict__.pop("forward", None)  # the class's forward again
        self._held.clear()


@contextlib.contextmanager
def streamed_model(cls, root: Path, *, attn_implementation: str | None = None,
                   progress: Progress | None = None) -> Iterator[StreamedModel]:
    """`cls` (a transformers class or Auto* class) over the safetensors of `root`, parameters
    read on use (module docstring); InvalidModel naming the tensors when the files and the model
    disagree."""
    import torch

    root = Path(root)
    refs = source_tensors(root)
    file = _file_label(refs.values())
    try:
        model = _empty_model(cls, root, attn_implementation)
    except (OSError, ValueError, KeyError) as e:  # transformers' text can hold paths
        raise InvalidModel(f"{file}: config.json does not describe a model transformers can build "
                           f"({type(e).__name__})", details={"file": file, "reason": "load_error"}) from None
    matched = check_names(model, refs, file)
    state = model.state_dict(keep_vars=True)  # the Parameter objects: tied ones are one object
    _check_shapes(state, refs, matched, file)
    groups: dict[int, list[str]] = {}
    for name, key in sorted(matched.items()):
        if not is_recomputed(key):
            groups.setdefault(id(state[key]), []).append(name)
    _check_ties(groups, refs, file)
    params = {id(p) for p in model.parameters()}
    for ident, names in groups.items():  # stored buffers (rare): loaded now, they are small
        if ident not in params:
            key = matched[names[0]]
            with torch.no_grad():
                state[key].copy_(_read_checked(refs[names[0]], file).to(state[key].dtype))
    runner = StreamedModel(model, {i: refs[n[0]] for i, n in groups.items()}, file, progress)
    try:
        yield runner
    finally:
        runner.close()
        del model


__all__ = ["StreamedModel", "streamed_model"]
