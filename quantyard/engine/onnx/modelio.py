"""ONNX files on disk: one file below protobuf's 2 GB limit, `<name>.data` beside it above."""

from __future__ import annotations

from pathlib import Path

# protobuf refuses messages over 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def data_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".data")


def artifact_files(path: Path) -> list[Path]:
    data = data_path(path)
    return [Path(path), data] if data.is_file() else [Path(path)]


def artifact_size(path: Path) -> int:
    return sum(p.stat().st_size for p in artifact_files(path))


def is_large(path: Path) -> bool:
    return data_path(path).is_file()


def _tensor_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model, path: Path) -> list[Path]:
    """Write a ModelProto (tensors in memory) at `path`, external data when it is large."""
    import onnx

    path, data = Path(path), data_path(path)
    data.unlink(missing_ok=True)
    if _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return artifact_files(path)


def consolidate(path: Path) -> list[Path]:
    """A model written with external data becomes one file again when it is small enough."""
    import onnx

    data = data_path(path)
    if data.is_file() and data.stat().st_size <= EXTERNAL_DATA_THRESHOLD:
        model = onnx.load(str(path))  # pulls the external tensors into memory
        data.unlink()
        onnx.save_model(model, str(path))
    return artifact_files(path)


def externalize(path: Path) -> list[Path]:
    """Move a single-file model's tensors into `<name>.data` beside it (a no-op when they are
    there already)."""
    import onnx

    path, data = Path(path), data_path(path)
    if not data.is_file():
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    return artifact_files(path)


def finalize(path: Path, *, external_data: bool) -> list[Path]:
    """The artifact's files as they ship: one file, or graph + `.data` when asked or too large."""
    return externalize(path) if external_data else artifact_files(path)


__all__ = ["save_model", "consolidate", "externalize", "finalize", "artifact_files", "artifact_size", "is_large", "data_path",
           "EXTERNAL_DATA_THRESHOLD"]
