"""Reference outputs in bounded memory (issue 11), and their stored file.

Oracles: transformers' own full-model forward (load_pretrained: from_pretrained, every tensor
proven) for the logits; llama.cpp inside validate_gguf; the operating system's peak RSS of a
child process for the memory bound.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantyard.engine.errors import InvalidModel, ValidationFailed
from quantyard.engine.gguf.reference import PROBE_TEXT, ReferenceOutputs, compute_reference
from tests.fixtures.models import ARCH_FIXTURES, REPO_ROOT


def _full_forward(source: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    from quantyard.engine.hf.strict_load import load_pretrained

    model = load_pretrained(AutoModelForCausalLM, source, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("family", ARCH_FIXTURES)
def test_bounded_reference_equals_full_forward(family, arch_models):
    ref = compute_reference(arch_models[family])
    want = _full_forward(arch_models[family], list(ref.token_ids))
    assert ref.logits.shape == want.shape and ref.text == PROBE_TEXT
    np.testing.assert_allclose(ref.logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ARCH_FIXTURES)
def test_weights_used_by_blocks_of_rows_give_the_same_logits(family, arch_models, monkeypatch):
    """Every weight above 64 KiB in float32 (the embedding and the output head of these 64-wide
    fixtures) goes through the by-rows paths: the head in blocks of 256 output rows, the
    embedding keeping only the rows its input uses. The logits equal the full forward's, every
    parameter is back on meta."""
    from transformers import AutoModelForCausalLM

    from quantyard.engine.hf import streamed

    monkeypatch.setattr(streamed, "ROW_BLOCK_BYTES", 64 << 10)
    ids = list(compute_reference(arch_models[family]).token_ids)
    with streamed.streamed_model(AutoModelForCausalLM, arch_models[family], attn_implementation="eager") as model:
        assert len(model._by_rows) >= 2, family  # at least the embedding and the output head
        padding = {id(m): m.padding_idx for m in model.model.modules() if hasattr(m, "padding_idx")}
        got = model.forward(ids)
        assert all(p.is_meta for p in model.model.parameters())
        assert padding == {id(m): m.padding_idx for m in model.model.modules() if hasattr(m, "padding_idx")}
    np.testing.assert_allclose(got, _full_forward(arch_models[family], ids), rtol=0, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in model.model.modules())  # the class's forward again


def test_a_nan_in_an_unused_embedding_row_is_still_refused(tiny_llama_dir, tmp_path, monkeypatch):
    """The embedding keeps only the rows the probe uses, but every row is read and checked."""
    from quantyard.engine.hf import streamed

    monkeypatch.setattr(streamed, "ROW_BLOCK_BYTES", 4096)

    def poison(t):
        t["model.embed_tokens.weight"][-1, 5] = np.nan  # the last id: no probe token
        return t

    with pytest.raises(InvalidModel, match="NaN or infinity") as err:
        compute_reference(_edited_copy(tiny_llama_dir, tmp_path / "nan", poison))
    assert err.value.details["tensors"] == ["model.embed_tokens.weight"]


@pytest.mark.parametrize("fixture", ["tiny_llama_sharded_dir", "tiny_llama_bf16_dir"])
def test_bounded_reference_sharded_and_bf16(fixture, request):
    source = request.getfixturevalue(fixture)
    ref = compute_reference(source)
    np.testing.assert_allclose(ref.logits, _full_forward(source, list(ref.token_ids)), rtol=0, atol=1e-5)


def test_each_tensor_read_once_per_use_and_progress(tiny_llama_dir):
    """Weights come from the files at forward time: one read per parameter (untied model), and
    none is left resident afterwards (every parameter is back on the meta device)."""
    from transformers import AutoModelForCausalLM

    from quantyard.engine.hf.streamed import streamed_model
    from quantyard.engine.hf.strict_load import source_tensors

    seen = []
    with streamed_model(AutoModelForCausalLM, tiny_llama_dir, attn_implementation="eager",
                        progress=lambda f, m: seen.append(f)) as model:
        model.forward([1, 20, 30])
        assert model.reads == len(source_tensors(tiny_llama_dir))
        assert all(p.is_meta for p in model.model.parameters())
    assert seen[-1] == 1.0 and seen == sorted(seen)


def _edited_copy(src: Path, dest: Path, edit) -> Path:
    """A copy of a single-file model whose tensors went through `edit(dict) -> dict`."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dest)
    tensors = edit(load_file(str(src / "model.safetensors")))
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_missing_parameter_refused_not_random(tiny_llama_dir, tmp_path):
    """The untied lm_head has the embedding's shape: on the meta device every tensor has the
    same (null) storage, so a tie check by storage would take it as tied. It must be refused."""
    bad = _edited_copy(tiny_llama_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(InvalidModel, match="needs tensors the upload does not have") as err:
        compute_reference(bad)
    assert err.value.details["tensors"] == ["lm_head.weight"]


def test_missing_layer_tensor_refused(tiny_llama_dir, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    bad = _edited_copy(tiny_llama_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(InvalidModel, match="needs tensors the upload does not have"):
        compute_reference(bad)


def test_unexpected_wrong_shape_and_nan_tensors_refused(tiny_llama_dir, tmp_path):
    extra = _edited_copy(tiny_llama_dir, tmp_path / "extra",
                         lambda t: {**t, "model.layers.0.mlp.extra.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(InvalidModel, match="has no place for"):
        compute_reference(extra)

    def transpose(t):
        t["model.layers.0.mlp.down_proj.weight"] = np.ascontiguousarray(t["model.layers.0.mlp.down_proj.weight"].T)
        return t

    with pytest.raises(InvalidModel, match="shape does not fit"):
        compute_reference(_edited_copy(tiny_llama_dir, tmp_path / "shape", transpose))

    def poison(t):
        t["model.layers.1.self_attn.o_proj.weight"][3, 7] = np.nan
        return t

    with pytest.raises(InvalidModel, match="NaN or infinity") as err:
        compute_reference(_edited_copy(tiny_llama_dir, tmp_path / "nan", poison))
    assert err.value.details["tensors"] == ["model.layers.1.self_attn.o_proj.weight"]


def test_tied_copy_with_other_values_refused(arch_models, tmp_path):
    """Gemma ties lm_head to the embedding: an lm_head.weight in the upload that differs from
    the embedding would be dropped silently; equal, it is accepted."""
    src = arch_models["gemma3"]

    def head(scale):
        def edit(t):
            emb = next(v for k, v in t.items() if k.endswith("embed_tokens.weight"))
            return {**t, "lm_head.weight": emb * scale}
        return edit

    ok = compute_reference(_edited_copy(src, tmp_path / "same", head(1.0)))
    np.testing.assert_array_equal(ok.logits, compute_reference(src).logits)
    with pytest.raises(InvalidModel, match="tied to one parameter hold different values"):
        compute_reference(_edited_copy(src, tmp_path / "differ", head(1.5)))


# --- the stored file ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_reference(tiny_llama_dir) -> ReferenceOutputs:
    return compute_reference(tiny_llama_dir)


def test_save_load_round_trip(tiny_reference, tmp_path):
    path = tmp_path / "ref.safetensors"
    tiny_reference.save(path)
    back = ReferenceOutputs.load(path)
    assert back.text == tiny_reference.text and back.token_ids == tiny_reference.token_ids
    assert back.logits.dtype == np.float32 and np.array_equal(back.logits, tiny_reference.logits)
    assert not back.logits.flags.writeable
    assert not list(tmp_path.glob(".*.tmp"))
    with open(path, "rb") as f:  # plain safetensors: no pickle anywhere
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    assert header["__metadata__"]["format"] == "quantyard.reference/1"


def _write(path: Path, tensors: dict, metadata: dict) -> Path:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case, match", [
    ("format", "format is 'something-else'"),
    ("no_text", "probe text is missing"),
    ("long_text", "longer than"),
    ("extra_tensor", "holds tensors"),
    ("f16_logits", "expected a 2-d F32 tensor"),
    ("row_mismatch", "token ids for"),
    ("id_range", "outside the vocabulary"),
    ("nan", "NaN or infinity"),
    ("too_many_tokens", "out of bounds"),
])
def test_hostile_reference_files_refused(case, match, tmp_path):
    logits = np.zeros((3, 8), np.float32)
    ids = np.array([1, 2, 3], "<i8")
    meta = {"format": "quantyard.reference/1", "text": "abc"}
    tensors = {"logits": logits, "token_ids": ids}
    if case == "format":
        meta["format"] = "something-else"
    elif case == "no_text":
        del meta["text"]
    elif case == "long_text":
        meta["text"] = "x" * (300 * 1024)
    elif case == "extra_tensor":
        tensors["more"] = ids
    elif case == "f16_logits":
        tensors["logits"] = logits.astype(np.float16)
    elif case == "row_mismatch":
        tensors["token_ids"] = ids[:2]
    elif case == "id_range":
        tensors["token_ids"] = np.array([1, 2, 8], "<i8")
    elif case == "nan":
        logits[1, 1] = np.inf
    elif case == "too_many_tokens":
        tensors = {"logits": np.zeros((5000, 1), np.float32), "token_ids": np.zeros(5000, "<i8")}
    path = _write(tmp_path / "r.safetensors", tensors, meta)
    with pytest.raises(InvalidModel, match=match) as err:
        ReferenceOutputs.load(path)
    assert err.value.message.startswith("reference outputs r.safetensors")


def test_corrupt_reference_file_refused(tiny_reference, tmp_path):
    path = tmp_path / "ref.safetensors"
    tiny_reference.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(InvalidModel, match="corrupt safetensors file cut.safetensors"):
        ReferenceOutputs.load(tmp_path / "cut.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(InvalidModel, match="header length"):
        ReferenceOutputs.load(tmp_path / "huge.safetensors")


# --- validation with a stored reference ------------------------------------------------------

@pytest.fixture(scope="module")
def f32_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    from quantyard.engine.gguf.converter import write_float_gguf
    from quantyard.engine.hf.source import open_source

    path = tmp_path_factory.mktemp("ref") / "tiny-F32.gguf"
    write_float_gguf(open_source(tiny_llama_dir), path, "F32")
    return path


def test_validate_with_reference_runs_no_model(f32_gguf, tiny_llama_dir, tiny_reference, tmp_path, monkeypatch):
    from quantyard.engine.gguf import validate

    path = tmp_path / "ref.safetensors"
    tiny_reference.save(path)
    stored = ReferenceOutputs.load(path)

    def refused(*a, **k):
        raise AssertionError("no transformers model may run when a reference is given")

    monkeypatch.setattr(validate, "compute_reference", refused)
    validate._REFERENCE_CACHE.clear()
    m = validate.validate_gguf(f32_gguf, tiny_llama_dir, "F32", reference=stored)
    assert m["max_abs_logit_diff"] < 0.01 and m["top1_agreement"] == 1.0

    drifted = ReferenceOutputs(text=stored.text, token_ids=stored.token_ids,
                               logits=stored.logits + np.random.default_rng(0).normal(0, 2, stored.logits.shape))
    with pytest.raises(ValidationFailed, match="drifts from its source"):
        validate.validate_gguf(f32_gguf, tiny_llama_dir, "F32", reference=drifted)
    other = ReferenceOutputs(text=stored.text, token_ids=(1,) + stored.token_ids[2:] + (5,), logits=stored.logits)
    with pytest.raises(ValidationFailed, match="not computed with this source's tokenizer"):
        validate.validate_gguf(f32_gguf, tiny_llama_dir, "F32", reference=other)


# --- memory -----------------------------------------------------------------------------------

_CHILD = r"""
import json, sys
from pathlib import Path
from quantyard.engine.gguf.reference import compute_reference
compute_reference(Path(sys.argv[1]))  # warm-up, same shapes in 1 layer: libraries, kernels, allocator
Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
base = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
compute_reference(Path(sys.argv[2]))
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"base": base, "peak": peak}))
"""


@pytest.fixture(scope="module")
def medium_llamas(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A 193 MB bf16 Llama (hidden 1024, 8 layers; 386 MB as float32; largest tensor 5.5 MiB)
    and the same shapes in one layer."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_memory import Shape, make_synthetic_model

    root = tmp_path_factory.mktemp("medium")
    shape = dict(hidden=1024, intermediate=2816, heads=8, kv_heads=4, vocab=1024)
    make_synthetic_model(root / "one", Shape(layers=1, **shape))
    return root / "one", root / "eight", make_synthetic_model(root / "eight", Shape(layers=8, **shape))


def test_reference_peak_memory_below_model_size(medium_llamas):
    """Loading the model would add >= 386 MB (float32) to the process's peak; streamed, the
    peak grows by a few of the largest float32 weights (11 MiB) past a one-layer run."""
    warm, model, facts = medium_llamas
    out = subprocess.run([sys.executable, "-c", _CHILD, str(warm), str(model)], capture_output=True,
                         text=True, timeout=300, cwd=REPO_ROOT, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grown = m["peak"] - m["base"]
    assert facts["weights_bytes"] > 190e6
    print(f"reference peak grew by {grown / 2**20:.1f} MiB for {facts['weights_bytes'] / 2**20:.0f} MiB of weights")
    # measured ~40 MiB: one float32 weight, its bf16 pages and the allocator's last freed one
    assert grown < facts["weights_bytes"] / 3, (grown, facts)
    assert grown < 4 * facts["largest_tensor_f32_bytes"] + 16 * 2**20, (grown, facts)


def test_meta_parameters_only_in_the_building_thread():
    """Another thread building a model while a streamed one is being built keeps real weights."""
    import threading

    import torch

    from quantyard.engine.hf.streamed import _parameters_on_meta

    inside, other_done, seen = threading.Event(), threading.Event(), {}

    def build_streamed():
        with _parameters_on_meta():
            inside.set()
            other_done.wait(10)
            seen["streamed"] = torch.nn.Linear(4, 4).weight.is_meta

    t = threading.Thread(target=build_streamed)
    t.start()
    inside.wait(10)
    seen["other"] = torch.nn.Linear(4, 4).weight.is_meta
    other_done.set()
    t.join()
    assert seen == {"streamed": True, "other": False}
    assert not torch.nn.Linear(4, 4).weight.is_meta  # the hook is gone afterwards
