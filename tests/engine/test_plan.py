"""The conversion plan (quantyard/engine/plan.py): decisions, recipe hashes, strict JSON.

Oracles: the recipe is recomputed here by hand from its definition (sha256 of canonical JSON of
source digest + target spec + engine version [+ input digests]), the planning rules from the
issue's text (one imatrix per calibration text, one ONNX export for two or more targets)."""

from __future__ import annotations

import hashlib
import json

import pytest

from quantyard.engine.manifest import ENGINE_VERSION
from quantyard.engine.plan import (
    MAX_MESSAGE_BYTES,
    ConversionPlan,
    InvalidPlan,
    Step,
    TargetTask,
    plan_conversion,
)
from quantyard.engine.spec import TargetSpec

SHA = "ab" * 32
FP32 = TargetSpec("onnx", "fp32", {})


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


def _plan(targets, **kw) -> ConversionPlan:
    return plan_conversion(source_sha256=SHA, targets=targets, **kw)


def test_gguf_decisions():
    plan = _plan(["gguf:F16", "gguf:Q8_0", "gguf:Q4_K_M", "gguf:F32"], source_dtype="F32")
    assert [s.id for s in plan.steps] == ["reference", "intermediate", "target:0", "target:1", "target:2"]
    assert plan.step("intermediate").spec == TargetSpec("gguf", "F32")
    assert plan.targets == ("target:0", "target:1", "target:2", "intermediate")  # F32 *is* the intermediate
    assert plan.step("target:0").inputs == ("reference",)  # float: straight from the source
    assert plan.step("target:1").inputs == ("intermediate", "reference")
    assert [s.id for s in plan.source_pass()] == ["intermediate", "target:0"]  # one read writes both


def test_intermediate_follows_the_source_dtype():
    assert _plan(["gguf:Q8_0"], source_dtype="BF16").step("intermediate").spec.quantization == "BF16"
    assert _plan(["gguf:Q8_0"], source_dtype="F64").step("intermediate").spec.quantization == "F32"


def test_one_imatrix_per_calibration_text():
    text = {"format": "gguf", "quantization": "IQ2_XS", "params": {"calibration_text": "some text"}}
    plan = _plan(["gguf:IQ2_XS", "gguf:IQ3_XXS", text, "gguf:Q4_K_M",
                  {"format": "gguf", "quantization": "Q4_K_M", "params": {"imatrix": True}}])
    imatrices = [s for s in plan.steps if s.kind == "imatrix"]
    assert len(imatrices) == 2
    default, custom = imatrices
    assert default.spec.params == {"calibration": "default"}
    assert custom.spec.params == {"calibration": hashlib.sha256(b"some text").hexdigest()}
    assert plan.step("target:0").input_of("imatrix") == plan.step("target:1").input_of("imatrix") == default.id
    assert plan.step("target:2").input_of("imatrix") == custom.id
    assert plan.step("target:3").input_of("imatrix") is None  # Q4_K_M does not need one
    assert plan.step("target:4").input_of("imatrix") == default.id  # ... unless it asks


def test_a_given_imatrix_serves_every_quantized_target():
    plan = _plan(["gguf:F16", "gguf:Q4_K_M", "gguf:IQ2_XS"], given_imatrix=True)
    assert [s.id for s in plan.steps if s.kind == "imatrix"] == ["imatrix:given"]
    assert plan.step("target:0").input_of("imatrix") is None
    assert plan.step("target:1").input_of("imatrix") == plan.step("target:2").input_of("imatrix") == "imatrix:given"


def test_onnx_export_shared_by_two_or_more():
    two = _plan(["onnx:int8-dynamic", "onnx:fp16", "onnx:fp32"], onnx_exports=[FP32, FP32, FP32])
    assert [s.id for s in two.steps] == ["onnx_fp32:0", "target:0", "target:1"]
    assert two.targets == ("target:0", "target:1", "onnx_fp32:0")  # the plain fp32 is the export
    assert two.step("target:0").inputs == ("onnx_fp32:0",)
    one = _plan(["onnx:int8-dynamic", "gguf:Q8_0"], onnx_exports=[FP32, None])
    assert one.step("target:0").inputs == ()  # alone: gains nothing from a separate export
    other = _plan(["onnx:int8-dynamic", {"format": "onnx", "quantization": "int8-dynamic", "params": {"opset": 18}},
                   "onnx:fp16"], onnx_exports=[FP32, TargetSpec("onnx", "fp32", {"opset": 18}), FP32])
    assert other.step("target:1").inputs == () and other.step("target:2").inputs == ("onnx_fp32:0",)


def test_gguf_source_is_its_own_intermediate():
    plan = _plan(["gguf:Q4_K_M", "gguf:Q8_0"], source_format="gguf")
    assert [s.id for s in plan.steps] == ["target:0", "target:1"]
    assert all(s.inputs == () for s in plan.steps)


def test_recipes_are_deterministic_and_match_their_definition():
    a = _plan(["gguf:Q4_K_M", "gguf:F16"], source_dtype="BF16")
    b = _plan(["gguf:Q4_K_M", "gguf:F16"], source_dtype="BF16")
    assert a.to_json() == b.to_json()
    q4 = a.step("target:0")
    want = {"input_sha256": SHA, "converter": "gguf", "engine_version": ENGINE_VERSION,
            "target": {"format": "gguf", "quantization": "Q4_K_M", "params": {}}}
    assert q4.recipe == want and q4.recipe_hash == _hash(want)
    digests = {"intermediate": "cd" * 32, "reference": "ef" * 32}
    recipe, digest = q4.artifact_recipe(digests)
    assert recipe == {**want, "intermediate_sha256": "cd" * 32}  # the reference is in no recipe
    assert digest == _hash(recipe)
    other = _plan(["gguf:Q4_K_M"], source_dtype="BF16")
    assert other.step("target:0").recipe_hash == q4.recipe_hash  # same spec, same source
    assert _plan(["gguf:Q4_K_M"]).step("target:0").recipe_hash == q4.recipe_hash
    assert plan_conversion(source_sha256="cd" * 32, targets=["gguf:Q4_K_M"]).step("target:0").recipe_hash \
        != q4.recipe_hash


def test_json_round_trip():
    plan = _plan(["gguf:F16", "gguf:IQ2_XS", "onnx:int8-dynamic", "onnx:fp16"],
                 onnx_exports=[None, None, FP32, FP32], source_dtype="BF16")
    again = ConversionPlan.from_json(plan.to_json())
    assert again == plan and [s.recipe for s in again.steps] == [s.recipe for s in plan.steps]
    task = TargetTask(step=plan.step("target:1"), source_sha256=SHA, engine_version=ENGINE_VERSION,
                      source_format="hf", artifacts={"intermediate": "art_1", "reference": "art_2",
                                                     "imatrix:default": "art_3"})
    assert TargetTask.from_json(task.to_json()) == task


def _task_dict() -> dict:
    plan = _plan(["gguf:Q8_0"])
    return TargetTask(step=plan.step("target:0"), source_sha256=SHA, engine_version=ENGINE_VERSION,
                      source_format="hf", artifacts={"intermediate": "art_1", "reference": "art_2"}).to_dict()


def _tampered(change) -> dict:
    d = json.loads(json.dumps(_task_dict()))
    change(d)
    return d


@pytest.mark.parametrize("change", [
    lambda d: d.update(extra=1),                                       # unknown field
    lambda d: d.pop("artifacts"),                                      # missing field
    lambda d: d["step"].update(kind="imatrix"),                        # kind not the id's
    lambda d: d["step"].update(id="target:0/../x"),                    # not a step id
    lambda d: d["step"]["spec"].update(quantization="Q9_9"),           # unknown quantization
    lambda d: d["step"]["spec"].update(quantization="q8_0"),           # not canonical
    lambda d: d["step"]["recipe"].update(engine_version="other/1"),    # recipe no longer hashes
    lambda d: d["step"].update(recipe_hash="0" * 64),                  # hash of another recipe
    lambda d: d.update(source_sha256="AB" * 32),                       # not lowercase hex
    lambda d: d.update(source_sha256="cd" * 32),                       # another source than the recipe's
    lambda d: d["artifacts"].pop("reference"),                         # an input without its artifact
    lambda d: d["artifacts"].update(reference="art 2; rm -rf"),        # not an artifact id
    lambda d: d["step"].update(inputs=["intermediate"] * 9),           # too many inputs
    lambda d: d.update(source_format="zip"),
])
def test_from_json_rejects_malformed_messages(change):
    with pytest.raises(InvalidPlan):
        TargetTask.from_json(json.dumps(_tampered(change)))


def test_from_json_rejects_oversized_and_non_json():
    with pytest.raises(InvalidPlan):
        TargetTask.from_json(b"{" * 10)
    big = _task_dict()
    big["step"]["spec"]["params"] = {"calibration_text": "x" * MAX_MESSAGE_BYTES}
    with pytest.raises(InvalidPlan):
        TargetTask.from_dict(big)
    with pytest.raises(InvalidPlan):
        TargetTask.from_json(json.dumps(big))
    with pytest.raises(InvalidPlan):
        TargetTask.from_json("[" * 100_000 + "]" * 100_000)  # too deep for json


def test_plan_from_json_rejects_a_broken_graph():
    plan = json.loads(_plan(["gguf:Q8_0"]).to_json())
    plan["steps"].reverse()  # a step before the one it reads
    with pytest.raises(InvalidPlan):
        ConversionPlan.from_json(json.dumps(plan))
    plan = json.loads(_plan(["gguf:Q8_0"]).to_json())
    plan["targets"] = ["target:7"]
    with pytest.raises(InvalidPlan):
        ConversionPlan.from_json(json.dumps(plan))
    with pytest.raises(InvalidPlan):
        Step.from_dict({"id": "reference"})
