"""Bring a job's inputs to local disk: the source (unpacked safely) and stored artifacts."""

from __future__ import annotations

from pathlib import Path

from quantyard.archive import extract_archive
from quantyard.engine.errors import InvalidModel


def source_info(source) -> dict:
    """What the pipelines need to know of a catalog source."""
    return {"id": source.id, "sha256": source.sha256, "key": source.storage_key,
            "name": source.name, "format": (source.meta or {}).get("format", "hf")}


def fetch_gguf_source(rt, source: dict, work_dir: Path) -> Path:
    path = work_dir / "source.gguf"
    rt.store.download_file(source["key"], path)
    return path


def fetch_source(rt, source: dict, work_dir: Path) -> Path:
    """The model folder of a source archive, unpacked under work_dir."""
    archive = work_dir / "source.archive"
    rt.store.download_file(source["key"], archive)
    unpacked = work_dir / "source"
    try:
        extract_archive(archive, unpacked, max_members=rt.settings.max_archive_members,
                        max_unpacked_bytes=rt.settings.max_unpacked_bytes)
    except ValueError as exc:
        raise InvalidModel(f"source {source['id']} could not be unpacked: {exc}") from exc
    finally:
        archive.unlink(missing_ok=True)
    return model_root(unpacked)


def model_root(unpacked: Path) -> Path:
    """Archives often wrap the model in one folder; the model root is where config.json is (or,
    for a program source, its .pt2 / TorchScript / .onnx file)."""
    from quantyard.engine.onnx.program_files import is_program_dir

    if (unpacked / "config.json").exists() or is_program_dir(unpacked):
        return unpacked
    children = [p for p in unpacked.iterdir() if p.is_dir()]
    if len(children) == 1 and ((children[0] / "config.json").exists() or is_program_dir(children[0])):
        return children[0]
    raise InvalidModel("the source holds no config.json at its top level (nor in a single folder)")


def fetch_artifact(rt, artifact: dict, work_dir: Path) -> Path:
    """The artifact's main file under work_dir, its companion files (external data, later
    shards) beside it under their own names, as the runtimes expect to find them."""
    path = work_dir / artifact["filename"]
    rt.store.download_file(artifact["storage_key"], path)
    for companion in (artifact.get("metadata") or {}).get("companion_files", []):
        rt.store.download_file(companion["key"], work_dir / companion["name"])
    return path
