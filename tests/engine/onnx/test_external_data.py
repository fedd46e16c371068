"""External data of uploaded .onnx sources (issue 10): every entry of every external tensor is
checked before onnxruntime or onnx reads it, and onnxruntime's own failures reach the tenant as
invalid_model in our words.

Oracles: a folder onnx.save_model itself wrote with external data converts and matches numpy's
x @ w; each hostile variant of it differs in one entry and must be refused naming the tensor and
the data file, with no server path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from quantyard import engine
from quantyard.engine.errors import InvalidModel

WEIGHT = np.arange(16, dtype=np.float32).reshape(4, 4) / 10


def _graph(initializers, nodes=None):
    from onnx import TensorProto, helper

    nodes = nodes or [helper.make_node("MatMul", ["x", "w"], ["y"])]
    return helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                          initializer=initializers),
        opset_imports=[helper.make_opsetid("", 17)])


def _genuine(root: Path) -> Path:
    """What onnx itself writes: model.onnx + w.bin holding the 64 bytes of WEIGHT."""
    import onnx
    from onnx import numpy_helper

    root.mkdir(parents=True, exist_ok=True)
    onnx.save_model(_graph([numpy_helper.from_array(WEIGHT, "w")]), str(root / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    assert (root / "w.bin").stat().st_size == 64
    return root


def _external(name: str, entries: dict[str, str], dims=(4, 4)):
    from onnx import TensorProto

    t = TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


def _hostile(root: Path, entries: dict[str, str], *, in_attribute: bool = False, repeat: str | None = None) -> Path:
    """model.onnx whose weight `w` has these external-data entries, beside a real 64-byte w.bin."""
    from onnx import helper

    root.mkdir(parents=True, exist_ok=True)
    (root / "w.bin").write_bytes(WEIGHT.tobytes())
    w = _external("w", entries)
    if repeat is not None:
        e = w.external_data.add()
        e.key, e.value = repeat, entries[repeat]
    if in_attribute:  # the weight as a Constant node's value, not an initializer
        nodes = [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("MatMul", ["x", "w"], ["y"])]
        model = _graph([], nodes)
    else:
        model = _graph([w])
    (root / "model.onnx").write_bytes(model.SerializeToString())
    return root


def _refused(root: Path, tmp_path: Path, *words: str) -> InvalidModel:
    for call in (lambda: engine.preflight(root, ["onnx:fp32"]), lambda: engine.convert(root, "onnx:fp32", tmp_path / "out")):
        with pytest.raises(InvalidModel) as info:
            call()
        message = str(info.value)
        assert info.value.code == "invalid_model"
        for word in ("model.onnx", "'w'", *words):
            assert word in message, (word, message)
        assert str(tmp_path) not in message and "ONNXRuntimeError" not in message, message
    assert not list(tmp_path.glob("out/**/*.onnx")), "an artifact was written"
    return info.value


def test_genuine_external_data_converts(tmp_path):
    import onnxruntime as ort

    root = _genuine(tmp_path / "prog")
    result = engine.convert(root, "onnx:fp32", tmp_path / "out")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    (y,) = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.abs(y - x @ WEIGHT).max() < 1e-5


HOSTILE = {
    "length-2^62": ({"location": "w.bin", "offset": "0", "length": str(2**62)},
                    ("w.bin", "length 4611686018427387904", "64 bytes")),
    "length-short": ({"location": "w.bin", "offset": "0", "length": "60"}, ("w.bin", "length 60", "64 bytes")),
    "offset-past-end": ({"location": "w.bin", "offset": "8", "length": "64"}, ("w.bin", "offset 8", "has 64 bytes")),
    "offset-2^63": ({"location": "w.bin", "offset": str(2**63)}, ("w.bin", f"offset {2**63}", "has 64 bytes")),
    "offset-negative": ({"location": "w.bin", "offset": "-1", "length": "64"}, ("w.bin", "offset", "'-1'")),
    "length-hex": ({"location": "w.bin", "length": "0x40"}, ("w.bin", "length", "'0x40'")),
    "length-spaces": ({"location": "w.bin", "length": " 64"}, ("w.bin", "length")),
    "parent-path": ({"location": "../../etc/passwd"}, ("../../etc/passwd",)),
    "absolute-path": ({"location": "/etc/passwd"}, ("/etc/passwd",)),
    "subfolder": ({"location": "sub/w.bin"}, ("sub/w.bin",)),
    "ort-memory-address": ({"location": "*/_ORT_MEM_ADDR_/*", "offset": "4096", "length": "64"},
                           ("_ORT_MEM_ADDR_",)),
    "dot-dot": ({"location": ".."}, ("'..'",)),
    "nul-in-name": ({"location": "w.bin\x00.txt"}, ("w.bin",)),
    "no-location": ({"offset": "0", "length": "64"}, ("''",)),
    "missing-file": ({"location": "absent.bin"}, ("absent.bin", "not a file")),
    "unknown-key": ({"location": "w.bin", "basepath": "/etc"}, ("unknown", "basepath")),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_external_data_is_refused(case, tmp_path):
    entries, words = HOSTILE[case]
    _refused(_hostile(tmp_path / "prog", entries), tmp_path, *words)


def test_a_repeated_key_is_refused(tmp_path):
    root = _hostile(tmp_path / "prog", {"location": "w.bin", "length": "64"}, repeat="location")
    _refused(root, tmp_path, "repeats", "location")


def test_external_tensors_in_node_attributes_are_checked(tmp_path):
    root = _hostile(tmp_path / "prog", {"location": "w.bin", "length": str(2**62)}, in_attribute=True)
    _refused(root, tmp_path, "w.bin", "length")


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(bytes(64))
    root = _hostile(tmp_path / "prog", {"location": "link.bin", "length": "64"})
    os.symlink(outside, root / "link.bin")
    _refused(root, tmp_path, "link.bin", "not a file")


def test_a_folder_as_location_is_refused(tmp_path):
    root = _hostile(tmp_path / "prog", {"location": "data"})
    (root / "data").mkdir()
    _refused(root, tmp_path, "'data'", "not a file")


def test_onnxruntime_load_failure_is_invalid_model_in_our_words(tmp_path):
    """A graph onnxruntime refuses (an operator nobody registered): invalid_model naming the file
    and the operator, not internal_error with onnxruntime's text (which names the server path)."""
    from onnx import helper, numpy_helper

    root = tmp_path / "prog"
    root.mkdir()
    model = _graph([numpy_helper.from_array(WEIGHT, "w")], [helper.make_node("NoSuchOperator", ["x", "w"], ["y"])])
    (root / "model.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InvalidModel) as info:
        engine.convert(root, "onnx:fp32", tmp_path / "out")
    message = str(info.value)
    assert message.startswith("model.onnx: onnxruntime cannot load it") and "NoSuchOperator" in message, message
    assert str(tmp_path) not in message and "ONNXRuntimeError" not in message and "Load model" not in message


def test_unparsable_onnx_names_the_file_without_protobuf_text(tmp_path):
    root = tmp_path / "prog"
    root.mkdir()
    (root / "model.onnx").write_bytes(b"\x08\x07\x12\xff\xff\xff\xff\x0fgarbage")
    with pytest.raises(InvalidModel) as info:
        engine.preflight(root, ["onnx:fp32"])
    assert "model.onnx" in str(info.value) and "Error parsing" not in str(info.value), str(info.value)
