"""GGUF -> GGUF quantization checked against llama.cpp's own quantizer.

For every quantization, our file must hold the same tensor types and the same tensor bytes as
llama.cpp's from the same F32 GGUF: `llama_cpp.llama_model_quantize` for plain types, the built
`llama-quantize --imatrix` (with the same imatrix file) for imatrix types and imatrix-assisted
K-quants. Two tiny Llamas: the shared fixture (2 layers, GQA 2) and an 8-layer one with GQA 4,
tied embeddings and a 384-wide FFN (ffn_down rows are not a multiple of 256: fallbacks).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from quantyard.engine import Cancelled, UnsupportedTarget, ValidationFailed, convert, parse_target
from quantyard.engine.gguf.ggml_types import FILE_TYPES
from quantyard.engine.gguf.imatrix import compute_imatrix
from quantyard.engine.gguf.llama_runtime import open_llama
from quantyard.engine.gguf.quality import check_quality, logit_metrics
from quantyard.engine.gguf.quantize import quantize_gguf
from tests.fixtures.models import cached_model, make_tiny_llama

from ._llama_tools import locate_llama_tools, run_tool

PLAIN = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
         "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS"]
WITH_IMATRIX = ["IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_XS", "IQ2_XXS"]
# plain types whose choices or kernels change with an imatrix (Q4_0/Q5_0 bump the first ffn_down
# layers, IQ4 drop a bump, every K-quant takes weights): also compared with an imatrix
ASSISTED = ["Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_0", "Q6_K", "IQ4_NL", "IQ4_XS"]
TEXT = "The lighthouse keeper wrote every night: wind, sea, ships. Quantization maps 1024 weights; café!"


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    return locate_llama_tools()


@pytest.fixture(scope="session")
def deep_llama_dir() -> Path:
    return cached_model("tiny-llama-deep384", make_tiny_llama, num_layers=8, num_heads=8, num_kv_heads=2,
                        intermediate_size=384, tie_word_embeddings=True)


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import gguf

    return {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="session")
def models(tiny_llama_dir, deep_llama_dir, tmp_path_factory) -> dict[str, dict]:
    """Per model: the HF dir, our F32 GGUF and an imatrix computed by us on the shipped text."""
    out = {}
    for key, hf_dir in (("tiny", tiny_llama_dir), ("deep", deep_llama_dir)):
        d = tmp_path_factory.mktemp(f"q-{key}")
        f32 = convert(hf_dir, parse_target("gguf:F32"), d).path
        shapes = _tensor_shapes(f32)
        n_blocks = 1 + max(int(n.split(".")[1]) for n in shapes if n.startswith("blk."))
        im = compute_imatrix(hf_dir, gguf_arch="llama", n_blocks=n_blocks, n_ctx=128, max_chunks=24,
                             gguf_tensors=shapes)
        out[key] = {"hf": hf_dir, "f32": f32, "imatrix": im.save(d / "imatrix.gguf"), "dir": d}
    return out


def llama_cpp_quantize(src: Path, dst: Path, quantization: str, *, allow_requantize: bool = False) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quantization].llama_ftype
    params.nthread = 2
    params.allow_requantize = allow_requantize
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def assert_same_tensors(ours: Path, ref: Path) -> None:
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    types = {n: (ta[n].tensor_type.name, tb[n].tensor_type.name) for n in ta if ta[n].tensor_type != tb[n].tensor_type}
    assert not types, f"tensor types differ (ours, llama.cpp): {types}"
    differ = [n for n in ta if bytes(ta[n].data) != bytes(tb[n].data)]
    assert not differ, f"tensor bytes differ: {differ}"
    ft = "general.file_type"
    assert a.fields[ft].contents() == b.fields[ft].contents()


def _cases():
    for q in PLAIN:
        yield pytest.param(q, False, id=q)
    for q in WITH_IMATRIX + ASSISTED:
        yield pytest.param(q, True, id=f"{q}-imatrix")


@pytest.mark.parametrize("quantization, use_imatrix", list(_cases()))
def test_matches_llama_cpp(models, llama_bin, quantization, use_imatrix):
    for key, m in models.items():
        tag = f"{quantization}-{use_imatrix}"
        ours, ref = m["dir"] / f"ours-{tag}.gguf", m["dir"] / f"ref-{tag}.gguf"
        report = quantize_gguf(m["f32"], ours, quantization, imatrix=m["imatrix"] if use_imatrix else None)
        if use_imatrix:
            run_tool(llama_bin, "llama-quantize", "--imatrix", m["imatrix"], m["f32"], ref, quantization, "2")
        else:
            llama_cpp_quantize(m["f32"], ref, quantization)
        assert_same_tensors(ours, ref)
        assert report.requantized_from is None and report.file_type == FILE_TYPES[quantization].llama_ftype
        if key == "deep" and FILE_TYPES[quantization].base_type in ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"):
            assert "blk.0.ffn_down.weight" in report.fallbacks  # 384-wide rows: the fallback path ran


def test_imatrix_is_required_for_very_low_bits(models, tmp_path):
    with pytest.raises(UnsupportedTarget, match="importance matrix"):
        quantize_gguf(models["tiny"]["f32"], tmp_path / "x.gguf", "IQ2_XS")
    assert not list(tmp_path.iterdir())


def _fields(path: Path) -> dict:
    import gguf

    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values() if not f.name.startswith("GGUF.")}


def test_metadata_is_copied_and_annotated(models, tmp_path):
    m = models["tiny"]
    out = tmp_path / "m.gguf"
    report = quantize_gguf(m["f32"], out, "Q4_K_M", imatrix=m["imatrix"],
                           extra_metadata={"quantyard.recipe_hash": "ab" * 32, "general.quantized_by": "Quantyard"})
    src, got = _fields(m["f32"]), _fields(out)
    for key, value in src.items():
        if key not in ("general.file_type", "general.quantization_version", "general.quantized_by"):
            assert got[key] == value, key
    assert got["general.file_type"] == 15 and got["general.quantization_version"] == 2
    assert got["quantize.imatrix.file"] == "imatrix.gguf"
    assert got["quantize.imatrix.dataset"] == "quantyard-calibration-v1"
    assert got["quantize.imatrix.entries_count"] == 14 and got["quantize.imatrix.chunks_count"] == 24
    assert got["quantyard.recipe_hash"] == "ab" * 32 and got["general.quantized_by"] == "Quantyard"
    assert report.imatrix["sha256"] and report.imatrix["entries_count"] == 14
    assert report.tensor_types == {"F32": 5, "Q4_K": 13, "Q6_K": 3} and 4.5 < report.bits_per_weight < 6.5


def test_requantize_q8_0_to_q4_k_m(models, tmp_path):
    m = models["tiny"]
    q8 = quantize_gguf(m["f32"], tmp_path / "q8.gguf", "Q8_0").path
    report = quantize_gguf(q8, tmp_path / "q4.gguf", "Q4_K_M")
    assert report.requantized_from == "Q8_0"
    # llama.cpp with --allow-requantize dequantizes the same way: identical bytes
    assert_same_tensors(report.path, llama_cpp_quantize(q8, tmp_path / "ref.gguf", "Q4_K_M", allow_requantize=True))


def test_f16_input(models, tmp_path):
    m = models["deep"]
    f16 = quantize_gguf(m["f32"], tmp_path / "f16.gguf", "F16").path
    report = quantize_gguf(f16, tmp_path / "q.gguf", "Q5_K_M")
    assert report.requantized_from is None
    assert_same_tensors(report.path, llama_cpp_quantize(f16, tmp_path / "ref.gguf", "Q5_K_M"))


def _logits(path: Path, text: str = TEXT) -> np.ndarray:
    llm = open_llama(model_path=str(path), logits_all=True, n_ctx=128, verbose=False, n_threads=2)
    try:
        ids = llm.tokenize(text.encode(), add_bos=True)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def test_split_output_loads_as_one_model(models, tmp_path):
    m = models["deep"]
    whole = quantize_gguf(m["f32"], tmp_path / "whole" / "m-Q8_0.gguf", "Q8_0")
    limit = whole.size_bytes // 3
    split = quantize_gguf(m["f32"], tmp_path / "split" / "m-Q8_0.gguf", "Q8_0", split_max_bytes=limit)
    n = len(split.paths)
    assert n >= 3 and [p.name for p in split.paths] == [f"m-Q8_0-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [p.name for p in split.paths]
    assert all(p.stat().st_size <= limit for p in split.paths)
    first, second = _fields(split.paths[0]), _fields(split.paths[1])
    assert (first["split.no"], first["split.count"], first["split.tensors.count"]) == (0, n, whole.tensor_count)
    assert set(second) == {"split.no", "split.count", "split.tensors.count"} and second["split.no"] == 1
    np.testing.assert_array_equal(_logits(split.paths[0]), _logits(whole.path))
    # a split set is also a valid input: requantizing it equals requantizing the whole file
    again = quantize_gguf(split.paths[0], tmp_path / "again.gguf", "Q4_K_M")
    assert_same_tensors(again.path, quantize_gguf(whole.path, tmp_path / "ref.gguf", "Q4_K_M").path)


@pytest.mark.parametrize("split", [False, True])
def test_cancel_removes_partial_outputs(models, tmp_path, split):
    calls = []

    def progress(frac, message):
        calls.append(frac)
        if len(calls) == 40:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        quantize_gguf(models["deep"]["f32"], tmp_path / "c.gguf", "Q4_K_M", progress=progress,
                      split_max_bytes=200_000 if split else None)
    assert list(tmp_path.iterdir()) == []
    assert calls == sorted(calls) and 0 < calls[0] < calls[-1] < 1


def test_quality_bounds_hold(models, tmp_path):
    """The bounds in quality.py hold on the tiny models for a spread of types, and a broken
    artifact (another model's weights) is refused with its numbers in the message."""
    from tests.engine.test_gguf_convert import hf_logits

    m = models["tiny"]
    _, ref = hf_logits(m["hf"], TEXT)
    for q in ("Q8_0", "Q4_K_M", "Q2_K", "IQ2_XS"):
        out = quantize_gguf(m["f32"], tmp_path / f"{q}.gguf", q, imatrix=m["imatrix"]).path
        metrics = check_quality(q, logit_metrics(ref, _logits(out)))
        assert metrics["mean_kl"] <= metrics["max_mean_kl_bound"]
    wrong = _logits(models["deep"]["f32"])  # ~1.6 nats from the tiny model's logits
    with pytest.raises(ValidationFailed, match=r"mean KL divergence \d+\.\d+ > 0.44; top-1 agreement") as e:
        check_quality("Q4_K_M", logit_metrics(ref, wrong))
    assert e.value.details["mean_kl"] > 0.44 and e.value.details["max_mean_kl_bound"] == 0.44
