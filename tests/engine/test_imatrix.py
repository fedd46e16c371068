"""Importance matrices: ours (torch hooks on the HF model) against llama-imatrix (ggml on our F32
GGUF) over the same text, and our files against llama.cpp's reader (llama-quantize)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from quantyard.engine import InvalidModel, convert, parse_target
from quantyard.engine.gguf.imatrix import (
    DEFAULT_DATASET,
    compute_imatrix,
    default_calibration_text,
    gguf_names_for,
    load_imatrix,
)

from ._llama_tools import locate_llama_tools, run_tool

N_CTX, CHUNKS = 128, 24


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory) -> dict:
    import gguf

    d = tmp_path_factory.mktemp("imatrix")
    f32 = convert(tiny_llama_dir, parse_target("gguf:F32"), d).path
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in gguf.GGUFReader(f32).tensors}
    ours = compute_imatrix(tiny_llama_dir, gguf_arch="llama", n_blocks=2, n_ctx=N_CTX, max_chunks=CHUNKS,
                           gguf_tensors=shapes)
    text = d / "calibration.txt"
    text.write_text(default_calibration_text(), encoding="utf-8")
    return {"dir": d, "f32": f32, "ours": ours, "ours_path": ours.save(d / "ours.imatrix.gguf"), "text": text}


def _llama_imatrix(setup: dict, out: Path, *extra: str) -> Path:
    run_tool(locate_llama_tools(), "llama-imatrix", "-m", setup["f32"], "-f", setup["text"], "-o", out,
             "-c", str(N_CTX), "-b", str(N_CTX), "--chunks", str(CHUNKS), "--no-ppl", "-t", "2", *extra)
    return out


def test_matches_llama_imatrix(setup):
    ref = load_imatrix(_llama_imatrix(setup, setup["dir"] / "ref.imatrix.gguf"))
    ours = setup["ours"]
    assert sorted(ours.sums) == sorted(ref.sums) and len(ours.sums) == 14
    assert (ours.chunk_count, ours.chunk_size) == (ref.chunk_count, ref.chunk_size) == (CHUNKS, N_CTX)
    w_ours, w_ref = ours.weights(), ref.weights()
    worst = {}
    for name in ref.sums:
        # same tokens seen (same tokenization, same BOS-per-chunk rule)
        assert ours.counts[name].tolist() == ref.counts[name].tolist() == [CHUNKS * N_CTX]
        worst[name] = float(np.abs(w_ours[name] - w_ref[name]).max() / np.abs(w_ref[name]).max())
    print("max |ours - llama-imatrix| / max |llama-imatrix| per entry:",
          {k: f"{v:.1e}" for k, v in sorted(worst.items())})
    # torch float32 vs ggml float32 matmuls: measured <= 3e-4 of each entry's scale
    assert max(worst.values()) < 2e-3


def test_legacy_dat_and_gguf_read_alike(setup):
    """llama-imatrix's two formats of the same run give the same weights through our reader."""
    gguf_file = load_imatrix(_llama_imatrix(setup, setup["dir"] / "same.imatrix.gguf"))
    dat_file = load_imatrix(_llama_imatrix(setup, setup["dir"] / "same.imatrix.dat", "--output-format", "dat"))
    assert dat_file.is_legacy and not gguf_file.is_legacy
    assert dat_file.chunk_count == gguf_file.chunk_count == CHUNKS
    assert dat_file.datasets == gguf_file.datasets == [str(setup["text"])]
    a, b = dat_file.weights(), gguf_file.weights()
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5)


def test_save_load_roundtrip_and_provenance(setup):
    ours, path = setup["ours"], setup["ours_path"]
    back = load_imatrix(path)
    assert back.datasets == [DEFAULT_DATASET] and back.chunk_count == CHUNKS and back.chunk_size == N_CTX
    for name in ours.sums:
        np.testing.assert_array_equal(back.sums[name], ours.sums[name])
        np.testing.assert_array_equal(back.counts[name], ours.counts[name])
    assert back.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == ours.sha256
    assert back.provenance() == {"file": "ours.imatrix.gguf", "dataset": DEFAULT_DATASET, "entries_count": 14,
                                 "chunks_count": CHUNKS, "sha256": back.sha256}


def test_llama_quantize_reads_ours_without_complaint(setup):
    r = run_tool(locate_llama_tools(), "llama-quantize", "--imatrix", setup["ours_path"], setup["f32"],
                 setup["dir"] / "q.gguf", "IQ2_XS", "2")
    log = r.stdout + r.stderr
    assert "loaded 14 importance matrix entries" in log and f"computed on {CHUNKS} chunks" in log
    assert f"imatrix datasets=['{DEFAULT_DATASET}']" in log
    # like llama-imatrix's files, ours cover every block weight (output/token_embd are not collected)
    missing = [line for line in log.splitlines() if "did not find weights for" in line]
    assert missing and all(line.split()[-1] in ("output.weight", "token_embd.weight") for line in missing)
    assert "imatrix size" not in log


def test_user_text_and_short_text(tiny_llama_dir):
    im = compute_imatrix(tiny_llama_dir, gguf_arch="llama", n_blocks=2, text="word " * 400, n_ctx=64,
                         dataset="my-notes.txt")
    assert im.datasets == ["my-notes.txt"] and im.chunk_count >= 2
    with pytest.raises(InvalidModel, match="tokens"):
        compute_imatrix(tiny_llama_dir, gguf_arch="llama", n_blocks=2, text="too short", n_ctx=64)


def test_default_calibration_text_ships_with_the_package():
    text = default_calibration_text()
    assert len(text) > 10_000
    for sample in ("def scan", "SELECT", "Москва", "机器学习", "العلم", "Die Wissenschaft", "∞", "0x7FFF"):
        assert sample in text


def test_names_come_from_gguf_py_tables():
    assert gguf_names_for(["model.layers.3.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"],
                          "llama", 4) == {"model.layers.3.self_attn.q_proj": "blk.3.attn_q.weight",
                                          "model.layers.0.mlp.down_proj": "blk.0.ffn_down.weight",
                                          "lm_head": "output.weight"}
    assert gguf_names_for(["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"], "gpt2", 2) == {
        "transformer.h.1.attn.c_attn": "blk.1.attn_qkv.weight", "transformer.h.1.mlp.c_fc": "blk.1.ffn_up.weight"}
    assert gguf_names_for(["model.layers.0.mlp.gate_up_proj"], "phi3", 1) == {
        "model.layers.0.mlp.gate_up_proj": "blk.0.ffn_up.weight"}
    # Gemma 3 multimodal checkpoints wrap the text model
    assert gguf_names_for(["model.language_model.layers.2.self_attn.o_proj"], "gemma3", 4) == {
        "model.language_model.layers.2.self_attn.o_proj": "blk.2.attn_output.weight"}


def test_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x05\x00\x00\x00garbage")
    with pytest.raises(InvalidModel):
        load_imatrix(bad)
    with pytest.raises(InvalidModel):
        load_imatrix(tmp_path / "missing.gguf")
