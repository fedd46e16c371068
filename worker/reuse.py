"""Reuse by recipe hash, on the worker's side: which recipe hashes a target could have been made
by, whether an artifact of one of them is still usable (in the catalog *and* in the store), and
recording the reuse.

Where reuse is decided: in the prepare task, before the source is fetched, and again in each
target task before its inputs are fetched. Not in the API at submit time: a GGUF target's
recipe names the digests of the intermediate and importance matrix it was quantized from (an
ONNX target's, the digest of the fp32 export it shared with its job's other ONNX targets), and
knowing which intermediate a source gets (and which targets want an imatrix) is engine pipeline
knowledge the API does not carry; the byte check (HEAD per object) and the fall-back to
converting when the bytes turn out to be gone belong with the worker too. The cost is one
queue hop: a fully reusable job finishes in its prepare task without fetching or converting.
"""

from __future__ import annotations

import logging

from quantyard import catalog
from quantyard.catalog.reuse import recipe_digests, reusable_artifacts, reuse_artifact
from quantyard.engine.manifest import ENGINE_VERSION
from quantyard.engine.plan import LOSSLESS_TYPES, imatrix_spec, wants_imatrix
from quantyard.engine.spec import TargetSpec
from worker.publish import target_recipe

log = logging.getLogger(__name__)


def artifact_present(store, art: dict) -> bool:
    """Every file of the artifact is in the store with its recorded size."""
    if store.stat(art["storage_key"]) != art["size_bytes"]:
        return False
    companions = (art.get("metadata") or {}).get("companion_files") or []
    return all(store.stat(c["key"]) == c["size_bytes"] for c in companions)


def find_present(rt, digest: str, organization_id: str | None) -> dict | None:
    """The newest artifact of this recipe that is usable: not deleted, purged or withdrawn, and
    its bytes still in the store."""
    with rt.session() as s:
        candidates = [a.to_dict() for a in reusable_artifacts(s, recipe_hash=digest,
                                                              organization_id=organization_id)]
    return next((a for a in candidates if artifact_present(rt.store, a)), None)


def _digests_of(rt, spec: TargetSpec, source_sha256: str, organization_id: str | None) -> list[str]:
    _, digest = target_recipe(source_sha256=source_sha256, spec=spec, engine_version=ENGINE_VERSION, inputs={})
    with rt.session() as s:
        return recipe_digests(s, recipe_hash=digest, organization_id=organization_id)


def onnx_fp32_specs(spec: TargetSpec) -> list[TargetSpec]:
    """The shared fp32 exports (worker/pipeline.py _onnx_fp32) an ONNX target could have been
    quantized from, named without the source at hand: the default-opset export (params {}),
    and one at the target's own opset when it names one. The engine's onnx_fp32_spec picks the
    right one with the source's config; here one too many is harmless, since a recipe naming an
    export the pipeline never pairs with this target matches no recorded artifact."""
    specs = [TargetSpec("onnx", "fp32", {})]
    if "opset" in spec.params:
        specs.append(TargetSpec("onnx", "fp32", {"opset": spec.params["opset"]}))
    return specs


def _intermediate_digests(rt, spec: TargetSpec, source_sha: str, org: str | None) -> list[str]:
    """Digests of every intermediate this source ever had that a target of `spec` is made from."""
    if spec.format == "onnx":
        return [d for s in onnx_fp32_specs(spec) for d in _digests_of(rt, s, source_sha, org)]
    return [d for t in LOSSLESS_TYPES for d in _digests_of(rt, TargetSpec("gguf", t), source_sha, org)]


def candidate_recipes(rt, job: dict, spec: TargetSpec) -> list[str]:
    """Every recipe hash this target could have been made by, computed without making anything:
    straight from the source, or quantized from any intermediate (lossless GGUF, shared ONNX fp32
    export) and importance matrix this source ever had — those are named by their digests, which
    the catalog keeps even when their bytes are gone. Which targets are made from what is the
    engine's plan (engine/plan.py): GGUF float targets always straight from the source."""
    source_sha = job["source"]["sha256"]
    org = job.get("organization_id")
    hashes = [target_recipe(source_sha256=source_sha, spec=spec, engine_version=ENGINE_VERSION, inputs={})[1]]
    # A GGUF source is its own intermediate; a program source converts whole, per target; an
    # ONNX fp32 target is the shared export itself (same recipe when it asks nothing else).
    direct = spec.key == "onnx:fp32" or (spec.format == "gguf" and spec.quantization in LOSSLESS_TYPES
                                          and "split_max_size" not in spec.params)  # as the plan makes them
    if job["source"]["format"] in ("gguf", "program") or direct:
        return hashes
    intermediates = _intermediate_digests(rt, spec, source_sha, org)
    imatrices: list[str | None] = [None]
    if spec.format == "gguf" and wants_imatrix(spec):
        imatrices = _digests_of(rt, imatrix_spec(spec.params.get("calibration_text")), source_sha, org)
    for intermediate in intermediates:
        for imatrix in imatrices:
            inputs = {"intermediate_sha256": intermediate, "imatrix_sha256": imatrix}
            hashes.append(target_recipe(source_sha256=source_sha, spec=spec, engine_version=ENGINE_VERSION,
                                        inputs=inputs)[1])
    return list(dict.fromkeys(hashes))


def reuse(rt, job: dict, target_id: str, art: dict, digest: str) -> bool:
    """Answer the target with ``art`` (audited as ``artifact.reuse``); False if the artifact was
    deleted or withdrawn in the meantime."""
    try:
        with rt.session() as s:
            reuse_artifact(s, target_id=target_id, artifact_id=art["id"], recipe_hash=digest,
                           organization_id=job.get("organization_id"))
            s.commit()
    except catalog.InvalidState as exc:
        log.info("target %s not reused: %s", target_id, exc)
        return False
    log.info("target %s of job %s reuses artifact %s (recipe %s)", target_id, job["id"], art["id"], digest[:16])
    return True


def reuse_known_targets(rt, job: dict) -> list[str]:
    """Reuse what can be recognised before any work; returns the target ids reused."""
    reused = []
    for target_id, spec, status in job["targets"]:
        if status == "succeeded":
            continue
        for digest in candidate_recipes(rt, job, spec):
            art = find_present(rt, digest, job.get("organization_id"))
            if art is not None and reuse(rt, job, target_id, art, digest):
                reused.append(target_id)
                break
    return reused
