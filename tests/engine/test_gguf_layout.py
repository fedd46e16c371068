"""Our fast GGUF header reader agrees with gguf-py's GGUFReader (the reference reader) on every
key's raw bytes and decoded value, and on every tensor's place and size in the file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from quantyard.engine import convert, parse_target
from quantyard.engine.errors import InvalidModel
from quantyard.engine.gguf.gguf_input import GGUFInput


@pytest.fixture(scope="module", params=["F32", "Q4_K_M", "smollm2-BF16"])
def gguf_path(request, tiny_llama_bytelevel_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"layout-{request.param}")
    if request.param.startswith("smollm2"):  # a real 49,152-token vocabulary: long arrays
        from quantyard.engine.gguf.converter import write_float_gguf
        from quantyard.engine.hf.source import open_source

        smollm2_dir = request.getfixturevalue("smollm2_dir")
        write_float_gguf(open_source(smollm2_dir), out / "smollm2.gguf", "BF16")
        return out / "smollm2.gguf"
    return convert(tiny_llama_bytelevel_dir, parse_target(f"gguf:{request.param}"), out).path


def test_keys_values_and_raw_bytes_match_gguf_py(gguf_path):
    ref = gguf.GGUFReader(gguf_path)
    fields = [f for f in ref.fields.values() if not f.name.startswith("GGUF.")]
    with GGUFInput(gguf_path) as ours:
        assert ours.keys() == [f.name for f in fields]
        for f in fields:
            raw = bytes(ref.data[f.offset:f.offset + sum(int(p.nbytes) for p in f.parts)])
            assert ours.raw_kv(f.name) == raw, f.name
            value = ours.value(f.name)
            if value is None:  # long arrays are not decoded
                assert len(f.data) > 1024, f.name
            else:
                assert value == f.contents(), f.name


def test_tensors_match_gguf_py(gguf_path):
    ref = gguf.GGUFReader(gguf_path)
    with GGUFInput(gguf_path) as ours:
        assert list(ours.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            mine = ours.tensors[t.name]
            assert mine.ne == tuple(int(d) for d in t.shape)
            assert mine.type_id == int(t.tensor_type)
            assert np.array_equal(mine.raw, ref.data[t.data_offset:t.data_offset + t.n_bytes])


def test_truncated_file_is_an_invalid_model(gguf_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_path.read_bytes()[:2000])
    with pytest.raises(InvalidModel, match="cut.gguf"):
        GGUFInput(cut)
