"""Program sources over HTTP: a folder with one .pt2 / TorchScript / .onnx file is a source (its
kind read from the bytes), good for onnx targets and refused for gguf ones; pickles are refused at
upload without being loaded, and nothing is stored."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import pytest

from tests.api.conftest import upload


@pytest.fixture(scope="module")
def pt2_bytes(tmp_path_factory) -> bytes:
    import torch

    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    return path.read_bytes()


def _folder(client, files: dict[str, bytes], name="prog"):
    """The folder as a .tar.gz (what `quantyard submit` sends; multipart needs python-multipart)."""
    return upload(client, _tar_gz(files), name=name)


def _tar_gz(files: dict[str, bytes], prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for n, d in files.items():
            ti = tarfile.TarInfo(prefix + n)
            ti.size = len(d)
            tf.addfile(ti, io.BytesIO(d))
    return buf.getvalue()


def test_pt2_folder_is_a_program_source(client, pt2_bytes):
    inputs = json.dumps([{"name": "input", "shape": ["batch", 8], "dtype": "float32"}]).encode()
    r = _folder(client, {"mlp.pt2": pt2_bytes, "inputs.json": inputs})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["architecture"] == "torch.export"
    meta = body["metadata"]
    assert meta["format"] == "program" and meta["source_kind"] == "torch.export"
    assert meta["model_file"] == "mlp.pt2" and meta["inputs_json"] is True


def test_onnx_in_a_wrapped_folder_is_a_program_source(client):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    data = onnx.helper.make_model(graph).SerializeToString()
    r = upload(client, _tar_gz({"model.onnx": data, "README.md": b"hi"}, prefix="relu/"))
    assert r.status_code == 201, r.text
    meta = r.json()["metadata"]
    assert meta["source_kind"] == "onnx" and meta["model_root"] == "relu" and meta["inputs_json"] is False


def _evil_files(tmp_path, writer: str) -> bytes:
    marker = tmp_path / "pwned"
    if writer == "pickle":
        class System:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))
        return pickle.dumps(System())
    import torch

    class Evil(torch.nn.Linear):
        def __reduce_ex__(self, protocol):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    torch.save(Evil(2, 2), buf)
    return buf.getvalue()


@pytest.mark.parametrize("writer", ["pickle", "torch.save(module)"])
def test_malicious_pickle_is_refused_at_upload(client, app, tmp_path, writer):
    data = _evil_files(tmp_path, writer)
    assert not (tmp_path / "pwned").exists()
    r = _folder(client, {"model.pt": data})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_model" and "refused model.pt" in err["message"] and "pickle" in err["message"]
    assert not (tmp_path / "pwned").exists()
    assert app.state.store.list_keys("sources/") == []


def test_bare_pt2_upload_says_to_wrap_it(client, pt2_bytes):
    r = upload(client, pt2_bytes, content_type="application/zip")
    assert r.status_code == 400
    assert "inside a folder" in r.json()["error"]["message"]


def test_two_model_files_are_refused(client, pt2_bytes):
    r = _folder(client, {"a.pt2": pt2_bytes, "b.pt2": pt2_bytes})
    assert r.status_code == 400 and "exactly one model file" in r.json()["error"]["message"]


def test_program_source_takes_onnx_targets_not_gguf(client, pt2_bytes):
    source = _folder(client, {"mlp.pt2": pt2_bytes}).json()
    r = client.post("/v1/jobs", json={"source": source["id"], "targets": ["onnx:fp32", "gguf:Q8_0"]})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_target" and "targets[1]" in err["message"]
    assert "Hugging Face folder" in err["message"] and "torch.export" in err["message"]
    ok = client.post("/v1/jobs", json={"source": source["id"], "targets": ["onnx:fp32", "onnx:int8-dynamic"]})
    assert ok.status_code == 202, ok.text
    assert [t["format"] for t in ok.json()["targets"]] == ["onnx", "onnx"]
