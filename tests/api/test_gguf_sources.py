"""A single GGUF file is accepted as a source (to requantize): its header is read with the
standard library (gguf-py writes the file here, as an independent writer)."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np

from tests.api.conftest import upload


def _gguf_bytes(tmp_path, *, file_type: int, name: str = "tiny") -> bytes:
    path = tmp_path / f"{name}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_block_count(1)
    writer.add_token_list([f"t{i}" for i in range(100)])  # a long array the reader must skip
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_gguf_upload_becomes_a_source(client, app, tmp_path):
    data = _gguf_bytes(tmp_path, file_type=7)  # llama_ftype 7 = Q8_0
    r = upload(client, data, content_type="application/octet-stream", name=None)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["architecture"] == "llama" and body["name"] == "tiny"
    meta = body["metadata"]
    assert meta["format"] == "gguf" and meta["file_type"] == "Q8_0" and meta["quantized"] is True
    assert meta["tensor_count"] == 1
    key = body["storage_key"]
    assert key.endswith("source.gguf") and app.state.store.stat(key) == len(data)


def test_float_gguf_is_not_marked_quantized(client, tmp_path):
    r = upload(client, _gguf_bytes(tmp_path, file_type=1), content_type="application/octet-stream")
    assert r.status_code == 201, r.text
    assert r.json()["metadata"]["file_type"] == "F16"
    assert r.json()["metadata"]["quantized"] is False


def test_truncated_gguf_is_refused_and_nothing_is_stored(client, app, tmp_path):
    data = _gguf_bytes(tmp_path, file_type=7)[:40]
    r = upload(client, data, content_type="application/octet-stream")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_model"
    assert "GGUF" in r.json()["error"]["message"]
    assert app.state.store.list_keys("sources/") == []
