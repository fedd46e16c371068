"""One pass over the source for several float GGUFs (converter.write_float_ggufs), and ggml's
encoders split across threads.

Oracles: llama.cpp's convert_hf_to_gguf.py (--outtype f16 / bf16 / f32, its own gguf-py) for the
tensors; the single-file writer for the whole file (the one-pass writer must not change a byte);
the serial ggml call for the threaded one. Reads are counted at the safetensors reader.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantyard.engine import Cancelled
from quantyard.engine.gguf import converter, ggml_quants, vocab
from quantyard.engine.gguf.converter import write_float_gguf, write_float_ggufs
from quantyard.engine.gguf.ggml_types import GGML_TYPES
from quantyard.engine.gguf.gguf_layout import read_layout
from quantyard.engine.hf.source import open_source
from tests.fixtures.convert_shim import CONVERT_WITH_PRE_FALLBACK

from ._llama_tools import PREFIX, locate_llama_tools

OUTTYPES = ("F16", "BF16", "F32")


def _tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    """name -> (ggml type id, ne, data bytes), from the project's strict reader."""
    layout = read_layout(path)
    data = path.read_bytes()
    return {t.name: (t.type_id, tuple(t.ne), data[layout.data_offset + t.offset:][:t.nbytes])
            for t in layout.tensors}


@pytest.fixture(scope="module")
def one_pass(tiny_llama_bf16_dir, tmp_path_factory):
    """write_float_ggufs of a bf16 source to F16 + BF16 + F32, counting tensor reads and
    vocabulary builds."""
    out = tmp_path_factory.mktemp("one-pass")
    counts = {"reads": 0, "vocab": 0}
    real_read, real_record = converter.read_f32, vocab.record_vocab

    def counting_read(ref):
        counts["reads"] += 1
        return real_read(ref)

    def counting_record(*args, **kwargs):
        counts["vocab"] += 1
        return real_record(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(converter, "read_f32", counting_read)
    mp.setattr(converter, "record_vocab", counting_record)
    converter._VOCAB.clear()
    try:
        source = open_source(tiny_llama_bf16_dir)
        plans = write_float_ggufs(source, [(out / f"{t}.gguf", t) for t in OUTTYPES])
    finally:
        mp.undo()
    return {"dir": out, "source": source, "plans": plans, "counts": counts, "hf": tiny_llama_bf16_dir}


def test_reads_each_tensor_once_and_builds_the_vocabulary_once(one_pass):
    assert one_pass["counts"]["reads"] == len(one_pass["source"].tensors)
    assert one_pass["counts"]["vocab"] == 1
    assert [len(p) for p in one_pass["plans"]] == [len(one_pass["plans"][0])] * len(OUTTYPES)


def test_every_file_equals_the_single_file_writer(one_pass, tmp_path):
    converter._VOCAB.clear()  # the single writer builds its own vocabulary
    for t in OUTTYPES:
        alone = tmp_path / f"{t}.gguf"
        write_float_gguf(one_pass["source"], alone, t)
        assert alone.read_bytes() == (one_pass["dir"] / f"{t}.gguf").read_bytes(), t


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_tensors_equal_convert_hf_to_gguf(one_pass, outtype, tmp_path):
    locate_llama_tools()
    script = PREFIX / "src" / "convert_hf_to_gguf.py"
    ref = tmp_path / "llama-cpp.gguf"
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "NO_LOCAL_GGUF": "", "QY_FIXTURE_PRE": ""}
    r = subprocess.run([sys.executable, "-c", CONVERT_WITH_PRE_FALLBACK, str(script), str(one_pass["hf"]), "--outtype",
                        outtype.lower(), "--outfile", str(ref)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ours, theirs = _tensors(one_pass["dir"] / f"{outtype}.gguf"), _tensors(ref)
    assert sorted(ours) == sorted(theirs)  # the order is ours (archs.tensor_order_key), not the HF files'
    assert {n: v[:2] for n, v in ours.items()} == {n: v[:2] for n, v in theirs.items()}
    assert [n for n in ours if ours[n][2] != theirs[n][2]] == []


def test_cancel_removes_every_output(tiny_llama_bf16_dir, tmp_path):
    calls = []

    def progress(fraction, message):
        calls.append(message)
        if len(calls) > 2:
            raise Cancelled("stop")

    paths = [tmp_path / f"{t}.gguf" for t in ("F16", "BF16")]
    with pytest.raises(Cancelled):
        write_float_ggufs(open_source(tiny_llama_bf16_dir), list(zip(paths, ("F16", "BF16"), strict=True)),
                          progress=progress)
    assert not any(p.exists() for p in paths)


def test_refuses_quantized_types_and_shared_paths(tiny_llama_bf16_dir, tmp_path):
    source = open_source(tiny_llama_bf16_dir)
    with pytest.raises(ValueError, match="outtype"):
        write_float_ggufs(source, [(tmp_path / "a.gguf", "F16"), (tmp_path / "b.gguf", "Q8_0")])
    with pytest.raises(ValueError, match="share a path"):
        write_float_ggufs(source, [(tmp_path / "a.gguf", "F16"), (tmp_path / "a.gguf", "BF16")])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("chunk_values", [1 << 18, 1024])  # default; ~2 rows per chunk: many chunks
@pytest.mark.parametrize("type_name", ["F16", "BF16", "Q8_0", "Q4_K", "Q6_K", "IQ4_NL"])
def test_threaded_encoding_gives_the_serial_bytes(type_name, chunk_values, monkeypatch):
    monkeypatch.setattr(ggml_quants, "_CHUNK_VALUES", chunk_values)
    rng = np.random.default_rng(3)
    data = (rng.standard_normal((301, 512)) * 0.05).astype(np.float32)  # 301 rows: uneven split
    type_id = GGML_TYPES[type_name].id
    serial = ggml_quants.quantize(data, type_id, nthread=1)
    for n in (2, 3, 7):
        assert ggml_quants.quantize(data, type_id, nthread=n).tobytes() == serial.tobytes(), n
    rows = ggml_quants.quantize_rows(np.ascontiguousarray(data), type_id, nthread=2)
    assert rows.tobytes() == serial.tobytes()
