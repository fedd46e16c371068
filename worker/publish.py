"""Put a validated file in the object store and record it in the catalog, or neither."""

from __future__ import annotations

from quantyard import catalog
from quantyard.recipes import make_recipe, recipe_hash


def target_recipe(*, source_sha256: str, spec, engine_version: str, inputs: dict) -> tuple[dict, str]:
    """The recipe of an artifact: its source, what was asked, by which engine, from which
    inputs (intermediate, importance matrix) — hashed for reuse and lineage."""
    recipe = make_recipe(source_sha256=source_sha256, target=spec.to_dict(),
                         engine_version=engine_version)
    recipe.update({k: v for k, v in inputs.items() if v})
    return recipe, recipe_hash(recipe)


def publish(rt, *, job_id: str, target_id: str | None, source_id: str, result, key: str,
            recipe: dict, digest: str, parents: list[tuple[str, str]] | None = None,
            before_record=None) -> dict:
    """Upload `result.path` at `key`, then record the artifact (+ lineage, + audit) in one
    transaction; if recording fails the uploaded object is deleted again."""
    stored = rt.store.put_file(key, result.path)
    try:
        if before_record is not None:
            before_record()
        with rt.session() as s:
            artifact = catalog.record_artifact(
                s, job_id=job_id, target_id=target_id, source_id=source_id,
                format=result.format, quantization=result.quantization, sha256=stored.sha256,
                size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
                filename=result.path.name, metrics=result.metrics, metadata=result.metadata,
                engine_version=result.engine_version, recipe=recipe, recipe_hash=digest,
                parents=parents,
            )
            data = artifact.to_dict()
            s.commit()
        return data
    except BaseException:
        rt.store.delete(stored.key)  # never leave bytes the catalog does not know about
        raise
