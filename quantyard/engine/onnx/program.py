"""Program sources: a folder with one torch.export (.pt2), TorchScript or .onnx file.

describe() looks at file names and bytes only; input specs come from `inputs.json`, the target's
params (`inputs`, `axes`), the .pt2's own signature or the .onnx graph; sample_inputs() makes
the random feeds validation and calibration run on.

Input specs: a list of {"name", "shape": [int | axis name], "dtype", "range": [lo, hi]} (ranges
for integer inputs, both ends included; default [0, 9]), or {"inputs": [...], "axes": {...}}
where axes maps an axis name to its sample size (or three sizes, one per validation set).
A named axis is dynamic in the export. Batch-like axes (named "*batch*", or first in some
input's shape) sample 1, 3, 2 by default; other axes 8, 16, 12.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidModel, UnsupportedTarget
from ..jsonsafe import load_json_capped
from .program_files import INPUTS_FILE, PICKLE_KINDS, candidates, classify
from .program_vet import sample_inputs as pt2_sample_inputs
from .program_vet import vet_pt2_archive, vet_torchscript_archive

DTYPES = ("float32", "float16", "int64", "int32", "bool")
INT_DTYPES = ("int64", "int32")
DEFAULT_INT_RANGE = (0, 9)
BATCH_SIZES = (1, 3, 2)
OTHER_SIZE = 8
SETS = 3  # validation input sets, of different sizes along the dynamic axes


@dataclass(frozen=True)
class ProgramSource:
    root: Path
    kind: str  # "torch.export" | "torchscript" | "onnx"
    model_file: str
    inputs_json: bool

    @property
    def path(self) -> Path:
        return self.root / self.model_file


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # ints and axis names
    dtype: str
    range: tuple[int, int] | None = None


@dataclass(frozen=True)
class Specs:
    inputs: tuple[InputSpec, ...]
    # axis name -> sample size per validation set (SETS values); index 0 is the base size
    axes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    batch_axes: frozenset = frozenset()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def to_json(self) -> list[dict]:
        return [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype,
                 **({"range": list(i.range)} if i.range else {})} for i in self.inputs]


# ---------------------------------------------------------------- the folder


def describe(root: Path) -> ProgramSource:
    """Which file is the program and what it is; pickles refused before anything loads them."""
    root = Path(root)
    found = candidates(p.name for p in root.iterdir() if p.is_file())
    if not found:
        raise InvalidModel(f"{root.name} has neither config.json nor a model file (.pt2, .pt, .pth, .onnx)")
    if len(found) > 1:
        raise InvalidModel(f"a program source holds exactly one model file; found {', '.join(found)}",
                           details={"files": found})
    name = found[0]
    kind = classify(root / name)
    if kind in PICKLE_KINDS:
        refuse_pickle(root / name)
    if kind == "unknown":
        raise InvalidModel(f"{name} is neither a torch.export archive (torch.export.save), a TorchScript archive "
                           "(torch.jit.save) nor an ONNX model", details={"file": name})
    return ProgramSource(root, kind, name, (root / INPUTS_FILE).is_file())


def refuse_pickle(path: Path) -> None:
    """A pickle is never a program. Loaded weights_only (tensors and plain containers, nothing
    else is built) only to say which of two refusals it is; InvalidModel either way."""
    import torch

    advice = ("save the model with torch.export.save (.pt2) or torch.jit.save (TorchScript), or export it to "
              ".onnx, or upload a Hugging Face folder with config.json")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure of the restricted unpickler (or of the zip under it) refuses
        raise InvalidModel(
            f"refused {path.name}: an unsafe pickle (it names Python objects that loading would build or run; "
            f"Quantyard never unpickles arbitrary objects); {advice}",
            details={"file": path.name, "reason": "unsafe_pickle", "error": type(e).__name__}) from None
    raise InvalidModel(f"{path.name} holds only weights (a torch.save pickle of tensors), not a program; {advice}",
                       details={"file": path.name, "reason": "weights_only"})


# ---------------------------------------------------------------- input specs


def _shape(raw, where: str, error) -> tuple:
    if not isinstance(raw, list) or not raw:
        raise error(f"{where}.shape must be a non-empty list of sizes and axis names")
    out = []
    for d in raw:
        if isinstance(d, bool) or not (isinstance(d, int) and d > 0 or isinstance(d, str) and d.strip()):
            raise error(f"{where}.shape has {d!r}; use positive integers or axis names such as \"batch\"")
        out.append(d.strip() if isinstance(d, str) else d)
    return tuple(out)


def _range(raw, dtype: str, where: str, error) -> tuple[int, int] | None:
    if raw is None:
        return DEFAULT_INT_RANGE if dtype in INT_DTYPES else None
    if dtype not in INT_DTYPES:
        raise error(f"{where}.range is for integer inputs, not {dtype}")
    ok = isinstance(raw, list) and len(raw) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    if not ok or raw[0] > raw[1]:
        raise error(f"{where}.range must be [lo, hi] with integers lo <= hi, not {raw!r}")
    return int(raw[0]), int(raw[1])


def _one_input(raw, where: str, error) -> InputSpec:
    if not isinstance(raw, Mapping):
        raise error(f"{where} must be an object with name, shape and dtype")
    extra = set(raw) - {"name", "shape", "dtype", "range"}
    if extra:
        raise error(f"{where} has unknown keys {sorted(extra)}; valid: name, shape, dtype, range")
    name, dtype = raw.get("name"), raw.get("dtype", "float32")
    if not isinstance(name, str) or not name.strip():
        raise error(f"{where}.name must be a non-empty string")
    if dtype not in DTYPES:
        raise error(f"{where}.dtype {dtype!r} is not offered; valid: {', '.join(DTYPES)}")
    return InputSpec(name, _shape(raw.get("shape"), where, error), dtype, _range(raw.get("range"), dtype, where, error))


def _axes(raw, where: str, error) -> dict[str, tuple[int, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise error(f"{where} must map axis names to sample sizes")
    out = {}
    for name, value in raw.items():
        sizes = value if isinstance(value, list) else [value]
        if len(sizes) not in (1, SETS) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise error(f"{where}.{name} must be a positive size or a list of {SETS} sizes, not {value!r}")
        out[name] = tuple(sizes)
    return out


def parse_specs(raw, *, source: str) -> tuple[list[InputSpec], dict[str, tuple[int, ...]]]:
    """`raw` from inputs.json (source "inputs.json": InvalidModel) or a target's params (source
    "params": UnsupportedTarget): the specs and the axis sizes, every problem named."""
    error = InvalidModel if source == INPUTS_FILE else UnsupportedTarget
    where = INPUTS_FILE if source == INPUTS_FILE else "onnx param inputs"
    axes = None
    if isinstance(raw, Mapping) and source == INPUTS_FILE:
        raw, axes = raw.get("inputs"), raw.get("axes")
    if not isinstance(raw, list) or not raw:
        raise error(f"{where} must be a non-empty list of inputs ({{\"name\", \"shape\", \"dtype\"}})")
    specs = [_one_input(item, f"{where}[{i}]", error) for i, item in enumerate(raw)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise error(f"{where} names an input more than once: {names}")
    return specs, _axes(axes, f"{INPUTS_FILE}.axes", error)


def declared_specs(src: ProgramSource, params: Mapping[str, Any]) -> tuple[list[InputSpec] | None, dict]:
    """The specs the user gave: params `inputs` win over inputs.json; axis sizes merge."""
    specs: list[InputSpec] | None = None
    axes: dict = {}
    if src.inputs_json:
        raw = load_json_capped(src.root / INPUTS_FILE, name=INPUTS_FILE, max_bytes=1 << 20)
        specs, axes = parse_specs(raw, source=INPUTS_FILE)
    if params.get("inputs") is not None:
        specs, _ = parse_specs(params["inputs"], source="params")
    if params.get("axes") is not None:
        axes = {**axes, **_axes(params["axes"], "onnx param axes", UnsupportedTarget)}
    return specs, axes


def _sizes(base: int) -> tuple[int, ...]:
    return BATCH_SIZES if base == 1 else (base, 2 * base, base + max(1, base // 2))


def finish_specs(specs: list[InputSpec], axes: Mapping[str, tuple[int, ...]],
                 bounds: Mapping[str, tuple[int, int | None]] | None = None) -> Specs:
    """Sample sizes for every named axis: given, else 1/3/2 for batch-like axes and 8/16/12 for
    the others, clamped into the program's own bounds (a .pt2 knows them)."""
    bounds = bounds or {}
    named = [d for s in specs for d in s.shape if isinstance(d, str)]
    batch = {s.shape[0] for s in specs if isinstance(s.shape[0], str)} | {d for d in named if "batch" in d.lower()}
    unknown = set(axes) - set(named)
    if unknown:
        raise UnsupportedTarget(f"axes {sorted(unknown)} are not in any input's shape; named axes: {sorted(set(named))}")
    out = {}
    for name in dict.fromkeys(named):
        sizes = axes.get(name) or (BATCH_SIZES if name in batch else _sizes(OTHER_SIZE))
        sizes = sizes * SETS if len(sizes) == 1 else sizes
        lo, hi = bounds.get(name, (1, None))
        out[name] = tuple(max(lo, s if hi is None else min(hi, s)) for s in sizes)
    return Specs(tuple(specs), out, frozenset(batch))


def match_names(specs: list[InputSpec], expected: list[str], *, required: list[str] | None = None,
                what: str) -> list[InputSpec]:
    """Specs in the program's input order; UnsupportedTarget naming the program's inputs."""
    by_name = {s.name: s for s in specs}
    unknown = [n for n in by_name if n not in expected]
    missing = [n for n in (expected if required is None else required) if n not in by_name]
    if unknown or missing:
        raise UnsupportedTarget(f"input specs {sorted(by_name)} do not match {what}'s inputs {expected}"
                                + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else ""),
                                details={"expected": expected, "given": sorted(by_name)})
    return [by_name[n] for n in expected if n in by_name]


# ---------------------------------------------------------------- sample inputs


def concrete_shape(spec: InputSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)


def sample_inputs(specs: Specs, index: int = 0, *, seed: int = 0, override: Mapping[str, int] | None = None) -> dict:
    """Numpy feeds for validation set `index` (0..SETS-1); `override` fixes some axes (e.g.
    batch 1 for latency). Floats ~ N(0, 1), integers uniform in their range, bools fair coins."""
    import numpy as np

    rng = np.random.default_rng(seed * 1000 + index)
    sizes = {name: s[index] for name, s in specs.axes.items()}
    sizes.update(override or {})
    feeds = {}
    for spec in specs.inputs:
        shape = concrete_shape(spec, sizes)
        if spec.dtype in INT_DTYPES:
            lo, hi = spec.range or DEFAULT_INT_RANGE
            feeds[spec.name] = rng.integers(lo, hi + 1, size=shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def batch_override(specs: Specs, size: int) -> dict[str, int]:
    """Every batch-like axis at `size` (clamped to what the program allows: set 0 and up)."""
    return {a: size for a in specs.batch_axes if a in specs.axes}


# ---------------------------------------------------------------- loading, no pickle runs

# Graph calls a loaded program may make (the deserializer resolves any torch.*, math.* or
# _operator.* name): operators, higher-order operators, symbolic-size helpers, arithmetic.
SAFE_OPERATOR_FUNCS = frozenset("getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge "
                                "and_ or_ xor not_ invert lshift rshift".split())


def vet_pt2(path: Path) -> None:
    """Every member against what torch.export.save writes (program_vet), then the one pickle
    torch.export.load reads by design, the sample inputs, through torch's weights_only
    unpickler: if that fails, torch would retry it with weights_only=False."""
    import io

    import torch

    vet_pt2_archive(path)
    member, data = pt2_sample_inputs(path)
    if not data:
        return
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # any failure of the restricted unpickler means "not only tensors"
        raise _refuse(path, f"{member} is an unsafe pickle (not only tensors; Quantyard never unpickles "
                      "arbitrary objects)", "unsafe_pickle", member=member, error=type(e).__name__) from None


def vet_torchscript(path: Path) -> None:
    vet_torchscript_archive(path)


@contextlib.contextmanager
def weights_only_unpickling():
    """While torch loads a program, any unpickle that is not torch.load(weights_only=True)
    raises instead of running: torch.export.load's own fallbacks to weights_only=False
    (deserialize_torch_artifact, pickled payloads) and pickle.loads (opaque objects) included.
    Belt and braces under the vetting; meant for the sandboxed child that loads programs."""
    import pickle

    import torch

    real_load = torch.load

    def load(*args, weights_only=None, **kwargs):
        if weights_only is not True:
            raise pickle.UnpicklingError("an unpickle without weights_only=True was refused")
        return real_load(*args, weights_only=True, **kwargs)

    def refused(*args, **kwargs):
        raise pickle.UnpicklingError("an unrestricted unpickle was refused")

    saved = torch.load, pickle.loads, pickle.load, torch._C._pickle_load_obj
    torch.load, pickle.loads, pickle.load, torch._C._pickle_load_obj = load, refused, refused, refused
    try:
        yield
    finally:
        torch.load, pickle.loads, pickle.load, torch._C._pickle_load_obj = saved


def _refuse(path: Path, why: str, reason: str, **details) -> InvalidModel:
    return InvalidModel(f"refused {path.name}: {why}", details={"file": path.name, "reason": reason, **details})


def _safe_target(target) -> bool:
    import math
    import operator

    import torch

    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return True
    name = getattr(target, "__name__", None)
    if not isinstance(name, str):
        return False
    if getattr(operator, name, None) is target:
        return name in SAFE_OPERATOR_FUNCS
    if getattr(math, name, None) is target:
        return True
    return getattr(torch, name, None) is target and name.startswith("sym_")


def _check_ops(path: Path, program) -> None:
    """Only operators in the graph, none with a file argument (aten.from_file, aten.save):
    the deserializer resolves any torch.* name, torch.load included."""
    import torch

    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_method" or node.op == "call_function" and not _safe_target(node.target):
                raise _refuse(path, f"its graph calls {str(node.target)[:100]}, which is not a torch operator",
                              "unexpected_call")
            schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
            if schema is not None and any("file" in a.name.lower() or "path" in a.name.lower()
                                          for a in schema.arguments if "str" in str(a.type)):
                raise _refuse(path, f"its graph calls {schema.name}, which reads or writes files", "file_access")


@dataclass(frozen=True)
class TorchProgram:
    module: Any  # callable on positional tensors, in `names` order
    names: tuple[str, ...]
    required: tuple[str, ...]
    specs: list[InputSpec] | None  # what the program itself knows (a .pt2's example shapes)
    bounds: dict  # axis name -> (min, max or None)
    exportable: Any  # the nn.Module torch.onnx.export(dynamo=True) is given


_TORCH_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.int64": "int64",
                 "torch.int32": "int32", "torch.bool": "bool"}


def _pt2_specs(path: Path, program) -> tuple[list[InputSpec], dict]:
    """Input specs from the saved program: its symbolic dims are the dynamic axes."""
    import torch

    user = set(program.graph_signature.user_inputs)
    nodes = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    axes: dict[str, str] = {}
    specs = []
    for node in nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or str(val.dtype) not in _TORCH_DTYPES:
            raise InvalidModel(f"{path.name}: input {node.name} is {getattr(val, 'dtype', type(val).__name__)}; "
                               f"program inputs must be tensors of {', '.join(DTYPES)}")
        shape = []
        for d, size in enumerate(val.shape):
            if isinstance(size, int):
                shape.append(size)
                continue
            sym = str(size.node.expr)
            if sym not in axes:
                axes[sym] = "batch" if d == 0 and "batch" not in axes.values() else f"{node.name}_dim{d}"
            shape.append(axes[sym])
        specs.append(InputSpec(node.name, tuple(shape), _TORCH_DTYPES[str(val.dtype)],
                               DEFAULT_INT_RANGE if _TORCH_DTYPES[str(val.dtype)] in INT_DTYPES else None))
    bounds = {}
    for sym, vr in program.range_constraints.items():
        if str(sym) in axes:
            lo, hi = vr.lower, vr.upper  # int_oo (torch's integer infinity) is no sympy Integer
            bounds[axes[str(sym)]] = (max(1, int(lo)) if lo.is_Integer else 1, int(hi) if hi.is_Integer else None)
    return specs, bounds


def _pt2_load(path: Path, f):
    import pickle

    import torch

    try:
        return torch.export.load(f)
    except pickle.UnpicklingError:
        raise _refuse(path, "it holds an unsafe pickle that torch.export.load would unpickle without restriction",
                      "unsafe_pickle") from None


def load_torch(src: ProgramSource) -> TorchProgram:
    """The program as a callable torch module, vetted before anything is unpickled."""
    import torch

    path = src.path
    if src.kind == "torch.export":
        vet_pt2(path)
        with open(path, "rb") as f, weights_only_unpickling():  # a file object: torch warns on other names
            program = _pt2_load(path, f)
        _check_ops(path, program)
        specs, bounds = _pt2_specs(path, program)
        names = tuple(s.name for s in specs)
        module = program.module()
        return TorchProgram(module, names, names, specs, bounds, module)
    vet_torchscript(path)
    with weights_only_unpickling():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    args = module.forward.schema.arguments[1:]
    names = tuple(a.name for a in args)
    required = tuple(a.name for a in args if a.default_value is None)
    return TorchProgram(module, names, required, None, {}, None)


# ---------------------------------------------------------------- .onnx sources

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool"}


def check_external_data(src: ProgramSource, model) -> None:
    """Every external tensor in plain files beside the model, inside them, of the right length
    (external_data.py); before onnxruntime or onnx reads any of it."""
    from .external_data import check_external_data as check

    check(src.root, src.model_file, model)


def onnx_graph(src: ProgramSource):
    """The graph without its tensors (headers only), checked for safe external data."""
    import onnx

    try:
        model = onnx.load(str(src.path), load_external_data=False)
    except MemoryError:
        raise
    except Exception:  # protobuf's DecodeError and friends (their text is the library's): not an ONNX file
        raise InvalidModel(f"{src.model_file} is not a readable ONNX model (its protobuf does not parse)",
                           details={"file": src.model_file}) from None
    check_external_data(src, model)
    return model


def onnx_specs(model, name: str) -> list[InputSpec]:
    """Graph inputs (initializers excluded): dim_params and unnamed dims become dynamic axes."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tensor = inp.type.tensor_type
        dtype = _ONNX_DTYPES.get(tensor.elem_type)
        if dtype is None:
            raise InvalidModel(f"{name}: input {inp.name} has ONNX element type {tensor.elem_type}; "
                               f"supported: {', '.join(DTYPES)}")
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or f"{inp.name}_dim{i}")
                      for i, d in enumerate(tensor.shape.dim))
        specs.append(InputSpec(inp.name, shape, dtype, DEFAULT_INT_RANGE if dtype in INT_DTYPES else None))
    return specs


__all__ = ["ProgramSource", "InputSpec", "Specs", "describe", "refuse_pickle", "parse_specs", "declared_specs",
           "finish_specs", "match_names", "sample_inputs", "batch_override", "concrete_shape", "DTYPES", "SETS",
           "TorchProgram", "load_torch", "vet_pt2", "vet_torchscript", "onnx_specs", "weights_only_unpickling"]
