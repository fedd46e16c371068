"""Retention on SQLite and Postgres: soft delete and restore, legal hold blocking delete and purge,
purge removing the bytes from a real local store and from S3 (SeaweedFS), lineage of a deleted
parent, and the audit events of all of it (the chain still verifies)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from quantyard import catalog
from quantyard.catalog.retention import RetentionConflict
from quantyard.storage import LocalStore


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "objects")


def _artifact(factory, store, source, tmp_path, name: str, *, parents=None, companion: bool = False):
    """Real bytes in ``store`` (+ a companion file beside them), cataloged like the worker does."""
    main = tmp_path / f"{name}.gguf"
    main.write_bytes(name.encode() * 1000)
    stored = store.put_file(f"artifacts/{name}/{main.name}", main)
    metadata = {}
    if companion:
        extra = tmp_path / f"{name}-00002-of-00002.gguf"
        extra.write_bytes(b"x" * 500)
        more = store.put_file(f"artifacts/{name}/{extra.name}", extra)
        metadata["companion_files"] = [{"name": extra.name, "key": more.key, "sha256": more.sha256,
                                        "size_bytes": more.size_bytes}]
    with factory.begin() as s:
        art = catalog.record_artifact(
            s, job_id=None, target_id=None, source_id=source.id, format="gguf", quantization="Q8_0",
            sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
            filename=main.name, metrics={}, metadata=metadata, engine_version="e", recipe={"n": name},
            recipe_hash=stored.sha256, actor="test", parents=parents)
        return art.id, [stored.key] + [c["key"] for c in metadata.get("companion_files", [])]


def _events(factory, artifact_id):
    with factory() as s:
        return [(e.action, e.outcome, e.actor, dict(e.details or {}))
                for e in reversed(catalog.audit_events(s, resource_type="artifact", resource_id=artifact_id))]


def _visible_ids(factory, **kw):
    with factory() as s:
        return {a.id for a in catalog.list_artifacts(s, limit=100, **kw)[0]}


def test_soft_delete_hides_and_restore_brings_back(factory, store, source, tmp_path):
    art_id, keys = _artifact(factory, store, source, tmp_path, "a")
    with factory.begin() as s:
        art = catalog.delete_artifact(s, artifact_id=art_id, actor="key:maint", reason="superseded", grace_s=3600)
        assert art.deleted_by == "key:maint"
        assert timedelta(seconds=3599) < art.purge_after - art.deleted_at <= timedelta(seconds=3600)
    assert art_id not in _visible_ids(factory)
    assert art_id in _visible_ids(factory, include_deleted=True)
    assert all(store.stat(k) for k in keys)  # bytes stay during the grace period
    with factory.begin() as s:  # deleting again changes nothing
        again = catalog.delete_artifact(s, artifact_id=art_id, actor="key:other", grace_s=1)
        assert again.deleted_by == "key:maint"
    with factory.begin() as s:
        restored = catalog.restore_artifact(s, artifact_id=art_id, actor="key:maint")
        assert restored.deleted_at is None and restored.purge_after is None
    assert art_id in _visible_ids(factory)
    with factory.begin() as s, pytest.raises(RetentionConflict) as exc:
        catalog.restore_artifact(s, artifact_id=art_id, actor="key:maint")
    assert exc.value.code == "not_deleted"
    events = _events(factory, art_id)
    assert [(a, o) for a, o, _, _ in events] == [
        ("artifact.create", "success"), ("artifact.delete", "success"), ("artifact.delete", "noop"),
        ("artifact.restore", "success")]
    assert events[1][2] == "key:maint" and events[1][3]["reason"] == "superseded"
    with factory() as s:
        assert catalog.verify_audit_chain(s).ok


def test_legal_hold_blocks_delete_and_purge(factory, store, source, tmp_path):
    held_id, held_keys = _artifact(factory, store, source, tmp_path, "held")
    with factory.begin() as s:
        catalog.set_legal_hold(s, artifact_id=held_id, reason="case 42", actor="key:maint")
    with factory.begin() as s, pytest.raises(RetentionConflict) as exc:
        catalog.delete_artifact(s, artifact_id=held_id, actor="key:maint")
    assert exc.value.code == "legal_hold"
    with factory() as s:
        assert catalog.get_artifact(s, artifact_id=held_id).deleted_at is None

    # A hold placed after the delete stops the purge, grace period over or not.
    late_id, late_keys = _artifact(factory, store, source, tmp_path, "late")
    with factory.begin() as s:
        catalog.delete_artifact(s, artifact_id=late_id, actor="key:maint", grace_s=0)
        catalog.set_legal_hold(s, artifact_id=late_id, reason="subpoena", actor="key:maint")
    assert catalog.purge_due(factory, store, ignore_grace=True) == []
    assert all(store.stat(k) for k in late_keys + held_keys)

    with factory.begin() as s:
        catalog.release_legal_hold(s, artifact_id=late_id, actor="key:admin", reason="case closed")
    purged = catalog.purge_due(factory, store)
    assert [p["id"] for p in purged] == [late_id]
    assert all(store.stat(k) is None for k in late_keys)
    assert all(store.stat(k) for k in held_keys)
    actions = [a for a, *_ in _events(factory, late_id)]
    assert actions == ["artifact.create", "artifact.delete", "artifact.legal_hold",
                       "artifact.legal_hold_release", "artifact.purge"]
    assert [(a, o) for a, o, *_ in _events(factory, held_id)][-1] == ("artifact.legal_hold", "success")


def _purge_removes_bytes(factory, store, source, tmp_path):
    art_id, keys = _artifact(factory, store, source, tmp_path, "old", companion=True)
    _, keep_keys = _artifact(factory, store, source, tmp_path, "keep")
    with factory.begin() as s:
        deleted = catalog.delete_artifact(s, artifact_id=art_id, actor="key:maint", grace_s=60)
        deleted_at = deleted.deleted_at
    assert all(store.stat(k) for k in keys)
    assert catalog.purge_due(factory, store, now=deleted_at + timedelta(seconds=59)) == []
    assert all(store.stat(k) for k in keys)  # still within the grace period

    purged = catalog.purge_due(factory, store, now=deleted_at + timedelta(seconds=61))
    assert [(p["id"], sorted(p["keys"])) for p in purged] == [(art_id, sorted(keys))]
    assert [store.stat(k) for k in keys] == [None, None]  # the main file and its companion
    assert all(store.stat(k) for k in keep_keys)
    with factory() as s:
        art = catalog.get_artifact(s, artifact_id=art_id)
        assert art.purged_at == deleted_at + timedelta(seconds=61)
        assert art.to_dict()["deletion"]["purged_at"] is not None
    for call in (catalog.restore_artifact, catalog.delete_artifact):
        with factory.begin() as s, pytest.raises(RetentionConflict) as exc:
            call(s, artifact_id=art_id, actor="key:maint")
        assert exc.value.code == "purged"
    assert catalog.purge_due(factory, store, ignore_grace=True) == []  # once only
    (_, _, actor, details), = [e for e in _events(factory, art_id) if e[0] == "artifact.purge"]
    assert actor == "system:retention" and sorted(details["keys"]) == sorted(keys)
    with factory() as s:
        assert catalog.verify_audit_chain(s).ok


def test_purge_removes_bytes_from_a_local_store(factory, store, source, tmp_path):
    _purge_removes_bytes(factory, store, source, tmp_path)


def test_purge_removes_bytes_from_s3(factory, s3_server, source, tmp_path):
    store = s3_server.open_store()
    _purge_removes_bytes(factory, store, source, tmp_path)
    assert [k for k in store.list_keys("artifacts/") if k.startswith("artifacts/old/")] == []


def test_deleting_a_parent_keeps_lineage_and_children(factory, store, source, tmp_path):
    parent_id, _ = _artifact(factory, store, source, tmp_path, "parent")
    child_id, child_keys = _artifact(factory, store, source, tmp_path, "child", parents=[("artifact", parent_id)])
    with factory.begin() as s:
        catalog.delete_artifact(s, artifact_id=parent_id, actor="key:maint", grace_s=0)
    assert catalog.purge_due(factory, store)[0]["id"] == parent_id
    with factory() as s:
        up = catalog.lineage(s, artifact_id=child_id)["upstream"]
        (node,) = [n for n in up if n["id"] == parent_id]
        assert node["deleted"] and node["purged"] and node["exists"]
        assert catalog.get_artifact(s, artifact_id=child_id).deleted_at is None
    assert all(store.stat(k) for k in child_keys) and child_id in _visible_ids(factory)
    delete_event = next(d for a, _, _, d in _events(factory, parent_id) if a == "artifact.delete")
    assert delete_event["derived_artifacts"] == [child_id]
