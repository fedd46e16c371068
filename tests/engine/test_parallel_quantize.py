"""quantize_gguf's pipelined writer (next slab read in a helper thread, ggml's kernel on several
threads) gives llama.cpp's bytes whatever the slab size and thread count: tensors cut into many
slabs here (the fixtures' tensors are one slab each at the default size), compared with
llama_cpp.llama_model_quantize on the same F32 GGUF, and with a one-thread run."""

from __future__ import annotations

import pytest

from quantyard.engine import convert, parse_target
from quantyard.engine.gguf import quantize as q
from quantyard.engine.gguf.quantize import quantize_gguf

from .test_quantize import assert_same_tensors, llama_cpp_quantize


@pytest.fixture(scope="module")
def f32_gguf(tiny_llama_dir, tmp_path_factory):
    return convert(tiny_llama_dir, parse_target("gguf:F32"), tmp_path_factory.mktemp("pq")).path


@pytest.mark.parametrize("quantization", ["Q4_K_M", "Q8_0", "Q6_K"])
def test_many_slabs_many_threads_match_llama_cpp(f32_gguf, quantization, tmp_path, monkeypatch):
    ref = llama_cpp_quantize(f32_gguf, tmp_path / "ref.gguf", quantization)
    monkeypatch.setattr(q, "_SLAB_VALUES", 3 * 256)  # a 256-wide tensor: 3 rows per slab
    outs = {n: quantize_gguf(f32_gguf, tmp_path / f"ours-{n}.gguf", quantization, nthread=n).path
            for n in (1, 2, 3)}
    for n, path in outs.items():
        assert_same_tensors(path, ref)
        assert path.read_bytes() == outs[1].read_bytes(), n
