"""External data of an uploaded .onnx, checked before onnxruntime or onnx reads a byte of it.

A tensor stored outside the .onnx names a `location`, an `offset` and a `length`; onnxruntime
and onnx.load_external_data trust them. From an upload they are hostile input:
- a location with a path in it reads files outside the folder ("../../etc/passwd", "/etc/passwd"),
  and onnxruntime treats "*/_ORT_MEM_ADDR_/*" as "offset is a pointer into this process";
- a length of 2^62, or one that disagrees with the tensor's shape, makes onnxruntime fail with
  its own text (or, elsewhere, allocate what the number says).

So every external tensor of the model (initializers, sparse initializers and tensors in node
attributes, in every subgraph and function) must name a plain regular file beside the model,
carry only the keys onnx defines, with non-negative integer offset and length, lie inside that
file, and hold exactly the bytes its dtype and shape need. Anything else is InvalidModel naming
the model file, the tensor and the data file, never a server path.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import InvalidModel

_KEYS = frozenset({"location", "offset", "length", "checksum"})
# packed sub-byte types: bits per element (ONNX packs them, rounding the last byte up)
_PACKED_BITS = {21: 4, 22: 4, 23: 4, 25: 2, 26: 2}  # UINT4, INT4, FLOAT4E2M1, UINT2, INT2
_NO_EXTERNAL = {0: "UNDEFINED", 8: "STRING", 27: "FLOAT6E2M3", 28: "FLOAT6E3M2"}  # no fixed, known layout


def _graph_tensors(graph) -> Iterator:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node) -> Iterator:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        single = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for sparse in (*single, *attr.sparse_tensors):
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def all_tensors(model) -> Iterator:
    """Every TensorProto the model holds (protobuf's parser already bounds the nesting)."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _is_external(tensor) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == tensor.EXTERNAL


def needed_bytes(tensor, model_file: str) -> int:
    """How many bytes the tensor's dtype and shape take in external data."""
    from onnx import TensorProto, helper

    what = f"{model_file}: tensor {tensor.name!r}"
    if tensor.data_type in _NO_EXTERNAL or tensor.data_type not in TensorProto.DataType.values():
        name = _NO_EXTERNAL.get(tensor.data_type, str(tensor.data_type))
        raise InvalidModel(f"{what} has element type {name}, which cannot be stored as external data",
                           details={"file": model_file, "tensor": tensor.name, "field": "data_type"})
    if any(d < 0 for d in tensor.dims):
        raise InvalidModel(f"{what} has a negative dimension {list(tensor.dims)}",
                           details={"file": model_file, "tensor": tensor.name, "field": "dims"})
    count = 1
    for d in tensor.dims:
        count *= d
    bits = _PACKED_BITS.get(tensor.data_type) or 8 * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return (count * bits + 7) // 8


def _entries(tensor, model_file: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in _KEYS or entry.key in found:
            why = "repeats" if entry.key in found else "has an unknown"
            raise InvalidModel(f"{model_file}: tensor {tensor.name!r} {why} external data key {entry.key[:64]!r}",
                               details={"file": model_file, "tensor": tensor.name, "field": "external_data"})
        found[entry.key] = entry.value
    return found


def _plain_name(location: str) -> bool:
    return (bool(location) and location not in (".", "..") and "/" not in location and "\\" not in location
            and ":" not in location and location.isprintable() and len(location) <= 255)


def _integer(value: str | None, key: str, tensor, model_file: str, location: str) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 20):  # no sign, no spaces, < 2^64
        raise InvalidModel(f"{model_file}: tensor {tensor.name!r}: external data {key} {value[:32]!r} in "
                           f"{location!r} is not a non-negative integer",
                           details={"file": model_file, "tensor": tensor.name, "field": key, "location": location})
    return int(value)


def _file_size(root: Path, location: str) -> int | None:
    """Size of a regular file (not a link) named `location` in `root`, else None."""
    try:
        st = os.lstat(root / location)
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def check_tensor(root: Path, model_file: str, tensor) -> None:
    entries = _entries(tensor, model_file)
    location = entries.get("location", "")
    details = {"file": model_file, "tensor": tensor.name, "location": location[:255]}
    if not _plain_name(location):
        raise InvalidModel(f"{model_file}: tensor {tensor.name!r} points at external data {location[:255]!r}, "
                           "which is not a file name beside the model", details={**details, "field": "location"})
    size = _file_size(root, location)
    if size is None:
        raise InvalidModel(f"{model_file}: tensor {tensor.name!r} points at external data {location!r}, "
                           "which is not a file in the model's folder", details={**details, "field": "location"})
    offset = _integer(entries.get("offset"), "offset", tensor, model_file, location) or 0
    length = _integer(entries.get("length"), "length", tensor, model_file, location)
    needed = needed_bytes(tensor, model_file)
    if length is not None and length != needed:
        raise InvalidModel(f"{model_file}: tensor {tensor.name!r}: external data length {length} in {location!r} "
                           f"is not the {needed} bytes its type and shape {list(tensor.dims)} need",
                           details={**details, "field": "length", "length": length, "needed": needed})
    if offset + needed > size:
        raise InvalidModel(f"{model_file}: tensor {tensor.name!r}: external data offset {offset} + {needed} bytes "
                           f"runs past the end of {location!r}, which has {size} bytes",
                           details={**details, "field": "offset", "offset": offset, "needed": needed, "size": size})


def check_external_data(root: Path, model_file: str, model) -> None:
    """Every external tensor of `model` (the .onnx `model_file` in folder `root`) is sound."""
    root = Path(root)
    for tensor in all_tensors(model):
        if _is_external(tensor):
            check_tensor(root, model_file, tensor)


__all__ = ["check_external_data", "check_tensor", "needed_bytes", "all_tensors"]
