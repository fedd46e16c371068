"""A CycloneDX 1.6 ML-BOM for one artifact.

- ``components[0]``: the artifact, a ``machine-learning-model`` with its SHA-256, a model card
  (task, architecture, the measured metrics) and ``pedigree.ancestors``: the source model and the
  intermediate / importance matrix it was made from, each with its own SHA-256.
- ``formulation``: how it was made, one workflow whose tasks are the conversion steps (export,
  imatrix, quantize, validate) with the recipe parameters as inputs and the ancestors / the
  artifact as resources (by bom-ref).

Every bom-ref is unique in the document (the schema cannot check that; the tests do).
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import quote

from . import facts

SPEC_VERSION = "1.6"
MEDIA_TYPE = "application/vnd.cyclonedx+json; version=1.6"


def _ref(step: facts.Step) -> str:
    return f"quantyard:{step.type}:{step.id}"


def _hashes(sha256: Any) -> list[dict]:
    return [{"alg": "SHA-256", "content": sha256}] if sha256 else []


def _props(pairs: dict[str, Any]) -> list[dict]:
    return [{"name": f"quantyard:{k}", "value": v if isinstance(v, str) else json.dumps(v, sort_keys=True)}
            for k, v in pairs.items() if v is not None]


def _component(step: facts.Step, *, kind: str, description: str, extra: dict | None = None) -> dict:
    node = step.node
    comp: dict[str, Any] = {"type": kind, "bom-ref": _ref(step), "name": step.label}
    if node.get("sha256"):
        comp["version"] = f"sha256:{str(node['sha256'])[:12]}"
    comp["description"] = description
    if _hashes(node.get("sha256")):
        comp["hashes"] = _hashes(node.get("sha256"))
    comp["properties"] = _props({"id": step.id, "role": step.role, "format": node.get("format"),
                                 "quantization": node.get("quantization"), "size_bytes": node.get("size_bytes"),
                                 "recipe_hash": step.recipe_hash, **(extra or {})})
    return comp


def _ancestor(step: facts.Step, artifact: dict, source: dict) -> dict:
    if step.role == "source":
        name, repo = facts.base_model(artifact, source)
        comp = _component(step, kind="machine-learning-model", description=(
            f"The source model as uploaded (base model {name}); the hash is of the uploaded bytes."),
            extra={"architecture": step.node.get("architecture"), "base_model": name})
        if repo:
            comp["purl"] = f"pkg:huggingface/{quote(repo, safe='/')}"
            comp["externalReferences"] = [{"type": "model-card", "url": f"https://huggingface.co/{repo}"}]
        return comp
    if step.role == "imatrix":
        calibration = (step.recipe.get("target") or {}).get("params")
        comp = _component(step, kind="data", description="Importance matrix (llama.cpp imatrix format) "
                          "computed from calibration text on the intermediate.", extra={"calibration": calibration})
        comp["data"] = [{"type": "dataset", "name": "importance matrix",
                         "contents": {"properties": _props({"calibration": calibration})}}]
        return comp
    return _component(step, kind="machine-learning-model",
                      description=f"Intermediate {step.node.get('format')} {step.node.get('quantization')} "
                                  "conversion of the source, the input of quantization.")


def _model_card(artifact: dict, source: dict) -> dict:
    metrics = artifact.get("metrics") or {}
    params: dict[str, Any] = {"approach": {"type": "self-supervised"}}
    if facts.task(artifact, source):
        params["task"] = facts.task(artifact, source)
    params["architectureFamily"] = "transformer"
    arch = facts.architecture(artifact, source)
    if arch:
        params["modelArchitecture"] = arch
    context = "; ".join(f"{k}: {v}" for k, v in sorted(metrics.items()) if isinstance(v, str))
    perf = []
    for key, _label, value in facts.measured(metrics):
        entry = {"type": key, "value": json.dumps(value)}
        if context:
            entry["slice"] = context
        perf.append(entry)
    report = metrics.get("quality") if isinstance(metrics.get("quality"), dict) else {}
    evaluated = (f"evaluation text: {report.get('n_tokens')} tokens scored in {report.get('n_chunks')} chunks "
                 f"of {report.get('n_ctx')} (llama-perplexity --kl-divergence)")
    heldout = metrics.get("heldout") if isinstance(metrics.get("heldout"), dict) else {}
    for key, _label, _value in facts.quality(artifact):
        if key.startswith("heldout_"):  # an ONNX encoder's held-apart sentences
            perf.append({"type": f"quality.{key}", "value": json.dumps(heldout[key.removeprefix("heldout_")]),
                         "slice": f"{heldout.get('sentences')} held-apart sentences, batch 1, vs PyTorch"})
        else:
            perf.append({"type": f"quality.{key}", "value": json.dumps(report[key]), "slice": evaluated})
    speed = metrics.get("speed") if isinstance(metrics.get("speed"), dict) else {}
    hw = facts.hardware(artifact)
    timed = f"llama-bench style, hardware class {(hw or {}).get('hardware_class')}"
    perf += [{"type": f"speed.{key}", "value": json.dumps(speed[key]), "slice": timed}
             for key, _label, _value in facts.speed(artifact)]
    card: dict[str, Any] = {"bom-ref": f"quantyard:model-card:{artifact['id']}", "modelParameters": params,
                            "quantitativeAnalysis": {"performanceMetrics": perf}}
    notes = {"format": artifact.get("format"), "quantization": artifact.get("quantization"),
             "made_on": hw, "validated_against": "the source model (transformers / PyTorch) before upload"}
    card["properties"] = _props(notes)
    return card


def _params(recipe: dict) -> list[dict]:
    target = recipe.get("target") or {}
    pairs = {"converter": recipe.get("converter"), "format": target.get("format"),
             "quantization": target.get("quantization"), "engine_version": recipe.get("engine_version")}
    pairs.update({f"params.{k}": v for k, v in sorted((target.get("params") or {}).items())})
    pairs.update({k: v for k, v in recipe.items() if k.endswith("_sha256")})
    return [{"name": k, "value": v if isinstance(v, str) else json.dumps(v, sort_keys=True), "dataType": _json_type(v)}
            for k, v in pairs.items() if v is not None]


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array"}.get(type(value), "object")


def _task(step: facts.Step, refs: dict[tuple[str, str], str]) -> dict:
    action = {"intermediate": "export", "imatrix": "imatrix"}.get(step.role) or (
        "quantize" if any(t == "artifact" for t, _ in step.parents) else "convert")
    target = step.recipe.get("target") or {}
    inputs = [{"resource": {"ref": refs[p]}} for p in step.parents if p in refs]
    inputs.append({"parameters": _params(step.recipe)})
    return {
        "bom-ref": f"quantyard:task:{action}:{step.id}", "uid": step.recipe_hash or step.id,
        "name": f"{action} {target.get('format', '')}:{target.get('quantization', '')}".strip(),
        "taskTypes": ["build"], "inputs": inputs,
        "outputs": [{"type": "artifact", "resource": {"ref": refs[(step.type, step.id)]}}],
        "properties": _props({"recipe_hash": step.recipe_hash}),
    }


def _validate_task(artifact: dict, me: str) -> dict:
    metrics = artifact.get("metrics") or {}
    return {
        "bom-ref": f"quantyard:task:validate:{artifact['id']}", "uid": f"{artifact.get('recipe_hash')}:validate",
        "name": "validate against the source and measure", "taskTypes": ["test"],
        "inputs": [{"resource": {"ref": me}}],
        "outputs": [{"type": "metrics", "data": {"contentType": "application/json",
                                                 "content": json.dumps(metrics, sort_keys=True)}}],
    }


def _formulation(artifact: dict, steps: list[facts.Step], refs: dict) -> list[dict]:
    made = [s for s in steps if s.recipe and s.role != "source"]
    tasks = [_task(s, refs) for s in made] + [_validate_task(artifact, refs[("artifact", artifact["id"])])]
    by_node = {(s.type, s.id): t["bom-ref"] for s, t in zip(made, tasks, strict=False)}
    deps = []
    for s, t in zip(made, tasks, strict=False):  # a step runs after the steps that made its inputs
        upstream = [by_node[p] for p in s.parents if p in by_node]
        if upstream:
            deps.append({"ref": t["bom-ref"], "dependsOn": upstream})
    me = ("artifact", artifact["id"])
    if me in by_node:  # validation runs on what the last step made
        deps.append({"ref": tasks[-1]["bom-ref"], "dependsOn": [by_node[me]]})
    workflow = {"bom-ref": f"quantyard:workflow:{artifact['id']}",
                "uid": f"workflow:{artifact.get('recipe_hash') or artifact['id']}",
                "name": f"Quantyard conversion to {artifact.get('format')}:{artifact.get('quantization')}",
                "taskTypes": sorted({tt for t in tasks for tt in t["taskTypes"]}), "tasks": tasks,
                "taskDependencies": deps}
    if artifact.get("job_id"):
        workflow["properties"] = _props({"job_id": artifact["job_id"]})
    return [{"bom-ref": f"quantyard:formula:{artifact['id']}", "workflows": [workflow]}]


def ml_bom(artifact: dict, source: dict, lineage: dict, *, timestamp: str | None = None,
           base_url: str | None = None) -> dict:
    """CycloneDX 1.6 JSON (as a dict) for `artifact` (``Artifact.to_dict()``) made from `source`
    (``Source.to_dict()``), `lineage` as ``catalog.lineage`` returns it. `timestamp` (ISO 8601)
    defaults to the artifact's creation time, which keeps the document reproducible;
    `base_url` (the API's, ending in "/") adds download and model-card links."""
    steps = facts.chain(artifact, source, lineage)
    refs = {(s.type, s.id): _ref(s) for s in steps}
    me = next(s for s in steps if s.role == "artifact")
    tool_name, tool_version = facts.engine_tool(artifact.get("engine_version"))
    when = timestamp or artifact.get("created_at")
    component = _component(me, kind="machine-learning-model", description=(
        f"{artifact.get('quantization')} {artifact.get('format')} quantization of "
        f"{facts.base_model(artifact, source)[0]}, validated against its source by Quantyard."),
        extra={"engine_version": artifact.get("engine_version"), "bits_per_weight":
               (artifact.get("metrics") or {}).get("bits_per_weight")})
    component["purl"] = (f"pkg:generic/{quote(str(artifact.get('filename') or artifact['id']), safe='')}"
                         f"?checksum=sha256:{artifact.get('sha256')}")
    component["modelCard"] = _model_card(artifact, source)
    component["pedigree"] = {"ancestors": [_ancestor(s, artifact, source) for s in steps if s.role != "artifact"]}
    if base_url:
        root = f"{base_url.rstrip('/')}/v1/artifacts/{artifact['id']}"
        component["externalReferences"] = [{"type": "distribution", "url": f"{root}/download"},
                                           {"type": "model-card", "url": f"{root}/card"}]
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"quantyard:bom:{artifact.get('sha256')}:{artifact['id']}:{when}")
    bom: dict[str, Any] = {
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX", "specVersion": SPEC_VERSION, "serialNumber": serial.urn, "version": 1,
        "metadata": {"tools": {"components": [{"type": "application", "name": tool_name, "version": tool_version,
                                               "group": "quantyard"}]},
                     "properties": _props({"artifact_id": artifact["id"], "source_id": source.get("id")})},
        "components": [component],
        "formulation": _formulation(artifact, steps, refs),
    }
    if when:
        bom["metadata"] = {"timestamp": when, **bom["metadata"]}
    return bom
