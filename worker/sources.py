"""Bring a job's inputs to local disk: the source (unpacked safely) and stored artifacts."""

from __future__ import annotations

from pathlib import Path

from quantyard.archive import extract_archive
from quantyard.engine.errors import InvalidModel


def source_info(source) -> dict:
    """What the pipelines need to know of a catalog source."""
    return {"id": source.id, "sha256": source.sha256, "key": source.storage_key,
            "name": source.name, "format": (source.meta or {}).get("format", "hf")}


# Stored beside the intermediate (with the reference outputs): the source folder's files but its
# weights (config, tokenizer, chat template), all a GGUF target task needs of the source once the
# reference outputs are computed; it then never downloads the source archive (a model's size).
SOURCE_META = "source-meta.tar"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".npz",
                    ".pkl", ".data")
MAX_META_BYTES = 512 << 20  # a 262k-token tokenizer.json is ~35 MB


def pack_source_meta(source_dir: Path, out: Path) -> Path:
    """SOURCE_META of an unpacked source: its top-level files but the weights, in a plain tar."""
    import tarfile

    files = sorted(p for p in Path(source_dir).iterdir()
                   if p.is_file() and not p.is_symlink() and not p.name.lower().endswith(_WEIGHT_SUFFIXES))
    if sum(p.stat().st_size for p in files) > MAX_META_BYTES:
        raise InvalidModel(f"the source's files besides its weights exceed {MAX_META_BYTES >> 20} MiB")
    with tarfile.open(out, "w") as tar:
        for p in files:
            tar.add(p, arcname=p.name, recursive=False)
    return out


def unpack_source_meta(rt, archive: Path, work_dir: Path) -> Path:
    """The folder a SOURCE_META tar holds (unpacked as carefully as any upload)."""
    folder = work_dir / "source"
    try:
        extract_archive(archive, folder, max_members=rt.settings.max_archive_members,
                        max_unpacked_bytes=min(rt.settings.max_unpacked_bytes, MAX_META_BYTES))
    except ValueError as exc:
        raise InvalidModel(f"the stored source files could not be unpacked: {exc}") from exc
    return folder


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
