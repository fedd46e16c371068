"""The conversion plan: every decision about how one source becomes its targets, as plain data.

`plan_conversion` decides which lossless intermediate the GGUF targets are quantized from, which
targets share an importance matrix (one per distinct calibration text), whether the ONNX targets
share one fp32 export, which targets come straight from the source, where the reference outputs
are needed, and the recipe of every step. `quantyard convert` runs a plan in one process
(stages.execute_plan); the service runs its shared steps in the prepare task and sends each
remaining target step, serialised, to a task of its own. One planner, so a file made locally and
one made by the service are the same bytes.

Recipes: a step's recipe is its source's sha256, its spec and the engine version; a target step
made from other steps' files also names their sha256 (`intermediate_sha256`, `imatrix_sha256`),
known once they are made (`Step.artifact_recipe`); shared steps depend on the source alone. The
reference outputs are not in any recipe: they decide what a target is checked against, not its
bytes. Stdlib only: the API and the queue import it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedTarget
from .spec import TargetSpec, parse_target

KINDS = ("intermediate", "reference", "imatrix", "onnx_fp32", "target")
SOURCE_FORMATS = ("hf", "gguf", "program")
LOSSLESS_TYPES = ("F32", "F16", "BF16")
# An input step's file is named in a recipe by this key (the reference is in none: see above).
_RECIPE_INPUT_KEY = {"intermediate": "intermediate_sha256", "onnx_fp32": "intermediate_sha256",
                     "imatrix": "imatrix_sha256"}
# A message is read from the broker: bounded before it is parsed, and field by field after.
MAX_MESSAGE_BYTES = 4 << 20  # calibration text is up to 1 MiB per target (api/routes/jobs.py)
MAX_STEPS = 128
MAX_INPUTS = 8
_STEP_ID = re.compile(r"^[a-z_0-9]{1,24}(:[A-Za-z0-9_.-]{1,64})?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ARTIFACT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,80}$")
_VERSION = re.compile(r"^[A-Za-z0-9_.+/-]{1,60}$")


class InvalidPlan(ValueError):
    """A serialised plan, step or message that is malformed, oversized or inconsistent."""


# ---------------------------------------------------------------- recipes


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def make_recipe(*, source_sha256: str, target: Mapping[str, Any], engine_version: str) -> dict:
    return {"input_sha256": source_sha256, "converter": target["format"], "target": dict(target),
            "engine_version": engine_version}


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()


def artifact_recipe(*, source_sha256: str, spec: TargetSpec, engine_version: str,
                    inputs: Mapping[str, str | None]) -> tuple[dict, str]:
    """The recipe of an artifact: its source, what was asked, by which engine, from which input
    files ({"intermediate_sha256": ..., "imatrix_sha256": ...}; empty ones left out)."""
    recipe = make_recipe(source_sha256=source_sha256, target=spec.to_dict(), engine_version=engine_version)
    recipe.update({k: v for k, v in inputs.items() if v})
    return recipe, recipe_hash(recipe)


def imatrix_spec(text: str | None) -> TargetSpec:
    """The recipe spec of an importance matrix computed from this calibration text."""
    calibration = hashlib.sha256(text.encode()).hexdigest() if text else "default"
    return TargetSpec("imatrix", "imatrix", {"calibration": calibration})


GIVEN_IMATRIX = TargetSpec("imatrix", "imatrix", {"calibration": "given"})
REFERENCE_SPEC = TargetSpec("reference", "reference", {})


# ---------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    """One thing to make: `spec` from the files of the steps named in `inputs` (none: straight
    from the source). `recipe`/`recipe_hash`: without the input files' digests (artifact_recipe
    adds them); for a step without such inputs it is the artifact's recipe."""

    id: str
    kind: str
    spec: TargetSpec
    inputs: tuple[str, ...] = ()
    recipe: Mapping[str, Any] = field(default_factory=dict, compare=False)
    recipe_hash: str = ""

    def artifact_recipe(self, digests: Mapping[str, str | None]) -> tuple[dict, str]:
        """The recipe and its hash once the inputs are made: `digests` {input step id: sha256}."""
        named = {_RECIPE_INPUT_KEY[kind_of(i)]: digests.get(i) for i in self.inputs
                 if kind_of(i) in _RECIPE_INPUT_KEY and self.kind == "target"}
        recipe = dict(self.recipe)
        recipe.update({k: v for k, v in named.items() if v})
        return recipe, recipe_hash(recipe)

    def input_of(self, kind: str) -> str | None:
        return next((i for i in self.inputs if kind_of(i) == kind), None)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "spec": self.spec.to_dict(), "inputs": list(self.inputs),
                "recipe": dict(self.recipe), "recipe_hash": self.recipe_hash}

    @classmethod
    def from_dict(cls, data: Any) -> Step:
        """Strict: exactly these fields, a known kind, a canonical spec, a recipe that is this
        step's own (its hash and target match); InvalidPlan otherwise."""
        d = _fields(data, {"id", "kind", "spec", "inputs", "recipe", "recipe_hash"}, "step")
        step_id, kind = _step_id(d["id"]), d["kind"]
        if kind not in KINDS or kind_of(step_id) != kind:
            raise InvalidPlan(f"step {step_id!r}: kind {str(kind)[:20]!r} is not its own")
        inputs = d["inputs"]
        if not isinstance(inputs, list) or len(inputs) > MAX_INPUTS:
            raise InvalidPlan(f"step {step_id!r}: inputs must be a list of at most {MAX_INPUTS} step ids")
        spec = _spec(kind, d["spec"])
        recipe, digest = d["recipe"], d["recipe_hash"]
        if not isinstance(recipe, dict) or not isinstance(digest, str) or recipe_hash(recipe) != digest:
            raise InvalidPlan(f"step {step_id!r}: its recipe does not hash to its recipe_hash")
        if recipe.get("target") != spec.to_dict():
            raise InvalidPlan(f"step {step_id!r}: its recipe is for another spec")
        return cls(id=step_id, kind=kind, spec=spec, inputs=tuple(_step_id(i) for i in inputs),
                   recipe=recipe, recipe_hash=digest)


def kind_of(step_id: str) -> str:
    return step_id.split(":", 1)[0]


def _step(step_id: str, spec: TargetSpec, source_sha256: str, engine_version: str,
          inputs: Sequence[str] = ()) -> Step:
    recipe = make_recipe(source_sha256=source_sha256, target=spec.to_dict(), engine_version=engine_version)
    return Step(id=step_id, kind=kind_of(step_id), spec=spec, inputs=tuple(inputs), recipe=recipe,
                recipe_hash=recipe_hash(recipe))


@dataclass(frozen=True)
class ConversionPlan:
    """The steps in the order they can run, and for each target asked (in order) the id of the
    step that makes it: a target equal to the intermediate (or to the shared ONNX export) is
    made by that step."""

    source_sha256: str
    engine_version: str
    source_format: str
    steps: tuple[Step, ...]
    targets: tuple[str, ...]

    def step(self, step_id: str) -> Step:
        return next(s for s in self.steps if s.id == step_id)

    def shared(self) -> list[Step]:
        """The steps other steps are made from (intermediate, reference, imatrix, onnx fp32)."""
        return [s for s in self.steps if s.kind != "target"]

    def source_pass(self) -> list[Step]:
        """The steps one read of the source writes: the intermediate and every float GGUF target."""
        return [s for s in self.steps if s.kind == "intermediate" or (s.kind == "target" and is_float_gguf(s))]

    def to_json(self) -> str:
        return canonical_json({"source_sha256": self.source_sha256, "engine_version": self.engine_version,
                               "source_format": self.source_format, "targets": list(self.targets),
                               "steps": [s.to_dict() for s in self.steps]})

    @classmethod
    def from_json(cls, text: str | bytes) -> ConversionPlan:
        d = _fields(_loads(text), {"source_sha256", "engine_version", "source_format", "targets", "steps"}, "plan")
        steps, targets = d["steps"], d["targets"]
        if not isinstance(steps, list) or not 0 < len(steps) <= MAX_STEPS:
            raise InvalidPlan(f"a plan has 1 to {MAX_STEPS} steps")
        if not isinstance(targets, list) or len(targets) > MAX_STEPS:
            raise InvalidPlan("targets must be a list of step ids")
        if d["source_format"] not in SOURCE_FORMATS:
            raise InvalidPlan(f"unknown source format {str(d['source_format'])[:20]!r}")
        plan = cls(source_sha256=_hex(d["source_sha256"], "source_sha256"),
                   engine_version=_version(d["engine_version"]), source_format=d["source_format"],
                   steps=tuple(Step.from_dict(s) for s in steps), targets=tuple(_step_id(t) for t in targets))
        _check_graph(plan)
        return plan


def is_float_gguf(step: Step) -> bool:
    """A float GGUF made straight from the source (not quantized from another step's file)."""
    return step.spec.format == "gguf" and step.spec.quantization in LOSSLESS_TYPES and not step.input_of("intermediate")


def _check_graph(plan: ConversionPlan) -> None:
    """Ids unique, inputs made by earlier steps, every target made by a step, one source."""
    seen: set[str] = set()
    for s in plan.steps:
        if s.id in seen or not set(s.inputs) <= seen:
            raise InvalidPlan(f"step {s.id!r} repeats an id or reads a step not made before it")
        if s.recipe.get("input_sha256") != plan.source_sha256 or s.recipe.get("engine_version") != plan.engine_version:
            raise InvalidPlan(f"step {s.id!r}: its recipe names another source or engine")
        seen.add(s.id)
    if not set(plan.targets) <= seen:
        raise InvalidPlan("a target names a step that is not in the plan")


# ---------------------------------------------------------------- planning


def wants_imatrix(target: TargetSpec) -> bool:
    """Imatrix types need one; any other quantized GGUF target may ask (params {"imatrix": true})."""
    from .gguf.ggml_types import FILE_TYPES  # stdlib only

    if target.format != "gguf" or target.quantization in LOSSLESS_TYPES:
        return False
    if target.quantization not in FILE_TYPES:  # gguf:auto: its presets need none unless asked
        return bool(target.params.get("imatrix"))
    return bool(target.params.get("imatrix")) or FILE_TYPES[target.quantization].needs_imatrix


def plan_conversion(*, source_sha256: str, targets: Sequence[TargetSpec | str | Mapping], source_format: str = "hf",
                    source_dtype: str = "F32", onnx_exports: Sequence[TargetSpec | None] | None = None,
                    calibration_text: str | None = None, given_imatrix: bool = False,
                    engine_version: str | None = None) -> ConversionPlan:
    """Every decision for these targets of one source (the order of `targets` is kept):

    - GGUF float targets straight from the source (one read writes them and the intermediate;
      one split into shards, params.split_max_size, from the intermediate by the quantizer's
      split writer); other GGUF targets quantized from the lossless intermediate (the source's own float type,
      else F32); a target equal to the intermediate *is* it. A GGUF source is its own
      intermediate; every target is quantized from it and checked against it.
    - one importance matrix per distinct calibration text (a target's params.calibration_text,
      else `calibration_text`, else the shipped one) among the targets that want one; with
      `given_imatrix`, the given file for every quantized GGUF target, as llama-quantize does.
    - the reference outputs once, for every GGUF target of a Hugging Face source.
    - one fp32 ONNX export when two or more ONNX targets share it (`onnx_exports`: per target,
      the export it can be made from, engine.onnx_fp32_spec; None: converts alone); a plain
      fp32 target that asks nothing but that export is it.
    """
    if source_format not in SOURCE_FORMATS:
        raise UnsupportedTarget(f"unknown source format {source_format!r}")
    from .manifest import ENGINE_VERSION

    version = engine_version or ENGINE_VERSION
    specs = [parse_target(t) for t in targets]
    exports: list[TargetSpec | None] = list(onnx_exports) if onnx_exports is not None else [None] * len(specs)
    planner = _Planner(source_sha256, version, source_format)
    if source_format == "hf" and any(s.format == "gguf" for s in specs):
        planner.add("reference", REFERENCE_SPEC)
        dtype = source_dtype.upper()
        planner.add("intermediate", TargetSpec("gguf", dtype if dtype in LOSSLESS_TYPES else "F32"), ["reference"])
    shared_export = _shared_export(specs, exports)
    ids = [planner.target(i, spec, exports[i] if exports[i] == shared_export else None, calibration_text,
                          given_imatrix) for i, spec in enumerate(specs)]
    return ConversionPlan(source_sha256=source_sha256, engine_version=version, source_format=source_format,
                          steps=tuple(planner.steps), targets=tuple(ids))


def _shared_export(specs: list[TargetSpec], exports: list[TargetSpec | None]) -> TargetSpec | None:
    """The first ONNX target's export, when at least two targets would use it (one target alone
    gains nothing from a separate export)."""
    first = next((e for e in exports if e is not None), None)
    users = [i for i, e in enumerate(exports) if e is not None and e == first and _uses_export(specs[i])]
    return first if len(users) >= 2 else None


def _uses_export(spec: TargetSpec) -> bool:
    """Quantized from the export, or (a plain fp32 asking only for the opset) the export itself;
    an fp32 with params of its own (e.g. external_data) converts alone."""
    return spec.quantization != "fp32" or set(spec.params) <= {"opset"}


class _Planner:
    def __init__(self, source_sha256: str, version: str, source_format: str):
        self.sha, self.version, self.source_format = source_sha256, version, source_format
        self.steps: list[Step] = []

    def add(self, step_id: str, spec: TargetSpec, inputs: Sequence[str] = ()) -> str:
        if all(s.id != step_id for s in self.steps):
            self.steps.append(_step(step_id, spec, self.sha, self.version, inputs))
        return step_id

    def target(self, index: int, spec: TargetSpec, export: TargetSpec | None, calibration_text: str | None,
               given_imatrix: bool) -> str:
        if spec.format == "gguf":
            return self._gguf(index, spec, calibration_text, given_imatrix)
        if export is None or not _uses_export(spec):
            return self.add(f"target:{index}", spec)
        fp32 = self.add("onnx_fp32:0", export)
        return fp32 if spec == export else self.add(f"target:{index}", spec, [fp32])

    def _gguf(self, index: int, spec: TargetSpec, calibration_text: str | None, given_imatrix: bool) -> str:
        if self.source_format != "hf":  # a GGUF source: quantized from it, checked against it
            return self.add(f"target:{index}", spec)
        intermediate = self.steps[1]
        if spec == intermediate.spec:
            return intermediate.id
        if spec.quantization in LOSSLESS_TYPES and "split_max_size" not in spec.params:
            return self.add(f"target:{index}", spec, ["reference"])
        # quantized, or a float target in shards: llama-quantize's writer, from the intermediate
        inputs = ["intermediate", "reference"]
        if given_imatrix and spec.quantization not in LOSSLESS_TYPES:
            inputs.append(self.add("imatrix:given", GIVEN_IMATRIX))
        elif wants_imatrix(spec):
            text = spec.params.get("calibration_text") or calibration_text
            imatrix = imatrix_spec(text)
            inputs.append(self.add(f"imatrix:{imatrix.params['calibration'][:16]}", imatrix, ["intermediate"]))
        return self.add(f"target:{index}", spec, inputs)


# ---------------------------------------------------------------- the service's target message


@dataclass(frozen=True)
class TargetTask:
    """What a target task is sent: the step, the plan's source and engine, and the artifact
    each input step was answered with ({input step id: artifact id})."""

    step: Step
    source_sha256: str
    engine_version: str
    source_format: str
    artifacts: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"step": self.step.to_dict(), "source_sha256": self.source_sha256,
                "engine_version": self.engine_version, "source_format": self.source_format,
                "artifacts": dict(self.artifacts)}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> TargetTask:
        return cls.from_dict(_loads(text))

    @classmethod
    def from_dict(cls, data: Any) -> TargetTask:
        """Strict, and capped like from_json: a message on the broker is read as hostile."""
        if len(canonical_json(data).encode()) > MAX_MESSAGE_BYTES if _jsonable(data) else True:
            raise InvalidPlan(f"a target message is JSON of at most {MAX_MESSAGE_BYTES} bytes")
        d = _fields(data, {"step", "source_sha256", "engine_version", "source_format", "artifacts"}, "message")
        step = Step.from_dict(d["step"])
        if step.kind != "target" and step.kind not in ("intermediate", "onnx_fp32"):
            raise InvalidPlan(f"step {step.id!r} of kind {step.kind} is not sent to a target task")
        artifacts = d["artifacts"]
        if not isinstance(artifacts, dict) or set(artifacts) != set(step.inputs) or not all(
                isinstance(v, str) and _ARTIFACT_ID.match(v) for v in artifacts.values()):
            raise InvalidPlan(f"step {step.id!r}: artifacts must name one artifact id per input step")
        if d["source_format"] not in SOURCE_FORMATS:
            raise InvalidPlan(f"unknown source format {str(d['source_format'])[:20]!r}")
        task = cls(step=step, source_sha256=_hex(d["source_sha256"], "source_sha256"),
                   engine_version=_version(d["engine_version"]), source_format=d["source_format"],
                   artifacts=dict(artifacts))
        if step.recipe.get("input_sha256") != task.source_sha256 or step.recipe.get("engine_version") != task.engine_version:
            raise InvalidPlan(f"step {step.id!r}: its recipe names another source or engine")
        return task


# ---------------------------------------------------------------- strict parsing helpers


def _loads(text: str | bytes) -> Any:
    if not isinstance(text, (str, bytes)) or len(text) > MAX_MESSAGE_BYTES:
        raise InvalidPlan(f"a plan or message is JSON of at most {MAX_MESSAGE_BYTES} bytes")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidPlan(f"not JSON: {type(exc).__name__}") from None


def _jsonable(data: Any) -> bool:
    try:
        canonical_json(data)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _fields(data: Any, names: set[str], what: str) -> dict:
    if not isinstance(data, dict) or set(data) != names:
        got = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise InvalidPlan(f"a {what} is an object with exactly the fields {sorted(names)}, not {got}")
    return data


def _step_id(value: Any) -> str:
    if not isinstance(value, str) or not _STEP_ID.match(value):
        raise InvalidPlan(f"{str(value)[:40]!r} is not a step id")
    return value


def _hex(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise InvalidPlan(f"{name} must be 64 lowercase hex digits")
    return value


def _version(value: Any) -> str:
    if not isinstance(value, str) or not _VERSION.match(value):
        raise InvalidPlan("engine_version is not a version string")
    return value


def _spec(kind: str, value: Any) -> TargetSpec:
    """A canonical spec of the kind's format (the manifest's for files, fixed ones otherwise)."""
    d = _fields(value, {"format", "quantization", "params"}, "spec")
    if not isinstance(d["params"], dict):
        raise InvalidPlan("a spec's params must be an object")
    if kind == "reference":
        spec = TargetSpec(d["format"], d["quantization"], d["params"])
        if spec != REFERENCE_SPEC:
            raise InvalidPlan("a reference step's spec is reference:reference without params")
        return spec
    if kind == "imatrix":
        calibration = d["params"].get("calibration")
        ok = (d["format"], d["quantization"], set(d["params"])) == ("imatrix", "imatrix", {"calibration"})
        if not ok or not isinstance(calibration, str) or not (calibration in ("default", "given")
                                                              or _HEX64.match(calibration)):
            raise InvalidPlan("an imatrix step's spec is imatrix:imatrix with params {calibration}")
        return TargetSpec("imatrix", "imatrix", {"calibration": calibration})
    try:
        spec = parse_target(d)
    except UnsupportedTarget as exc:
        raise InvalidPlan(f"spec: {exc}") from None
    if spec.to_dict() != d:
        raise InvalidPlan(f"spec {spec.key} is not in its canonical spelling")
    return spec


__all__ = ["ConversionPlan", "Step", "TargetTask", "InvalidPlan", "plan_conversion", "artifact_recipe",
           "make_recipe", "recipe_hash", "canonical_json", "imatrix_spec", "wants_imatrix", "kind_of",
           "is_float_gguf", "KINDS", "LOSSLESS_TYPES", "GIVEN_IMATRIX", "REFERENCE_SPEC"]
