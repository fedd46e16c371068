"""Validation without gguf-py's GGUFReader and with one tokenizer load per source, still strict.

Oracles: gguf-py (the vocabulary our reader returns, the in-place edits that corrupt a file),
transformers (the tokenizer the checks compare against), llama.cpp (logits, inside validation).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from quantyard.engine.errors import InvalidModel, ValidationFailed
from quantyard.engine.gguf.gguf_layout import array_values, read_layout
from quantyard.engine.gguf.validate import validate_gguf
from quantyard.engine.hf.tokenizer_cache import TokenizerCache, clear_tokenizers
from tests.fixtures.models import ARCH_FIXTURES


@pytest.fixture(scope="module")
def f32_file(tiny_llama_dir, tmp_path_factory) -> Path:
    from quantyard.engine.gguf.converter import write_float_gguf
    from quantyard.engine.hf.source import open_source

    path = tmp_path_factory.mktemp("fast") / "tiny-F32.gguf"
    write_float_gguf(open_source(tiny_llama_dir), path, "F32")
    return path


def _edit_string(path: Path, key: str, index: int | None, new: bytes) -> None:
    """Overwrite a string value in place with gguf-py (same byte length, so nothing moves)."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields[key]
    part = field.parts[field.data[index if index is not None else 0]]
    assert len(part) == len(new), (bytes(part), new)
    part[:] = np.frombuffer(new, dtype=np.uint8)
    del reader  # flushes the map


def test_array_values_match_gguf_py(f32_file):
    import gguf

    layout = read_layout(f32_file)
    pair = layout.kv["tokenizer.ggml.tokens"]
    assert pair.value is None or len(pair.value) <= 1024
    ours = array_values(pair, f32_file)
    field = gguf.GGUFReader(f32_file).fields["tokenizer.ggml.tokens"]
    assert ours == field.contents() and len(ours) == 512
    assert array_values(layout.kv["tokenizer.ggml.scores"], f32_file) == pytest.approx(
        gguf.GGUFReader(f32_file).fields["tokenizer.ggml.scores"].contents())
    with pytest.raises(InvalidModel, match="not an array"):
        array_values(layout.kv["general.architecture"], f32_file)
    with pytest.raises(InvalidModel, match="more than the 10 allowed"):
        array_values(pair, f32_file, max_items=10)


def test_validation_never_uses_gguf_reader_and_loads_tokenizer_once(f32_file, tiny_llama_dir, monkeypatch):
    import gguf
    import transformers

    loads = []
    real = transformers.AutoTokenizer.from_pretrained.__func__

    def counted(cls, *a, **k):
        loads.append(a[0] if a else k)
        return real(cls, *a, **k)

    def refused(*a, **k):
        raise AssertionError("validation must not use gguf.GGUFReader")

    clear_tokenizers()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(counted))
    monkeypatch.setattr(gguf, "GGUFReader", refused)
    for _ in range(3):  # three targets of one source
        m = validate_gguf(f32_file, tiny_llama_dir, "F32", expected_tensors=len(read_layout(f32_file).tensors))
        assert m["vocab_match"] and m["chat_template_match"] and m["has_chat_template"]
    assert len(loads) == 1, loads


def test_corrupt_token_fails(f32_file, tiny_llama_dir, tmp_path):
    """One ordinary token's text changed (same length, so the file stays well-formed and
    llama.cpp still loads it): the vocabulary check names the id."""
    from transformers import AutoTokenizer

    bad = tmp_path / "bad.gguf"
    shutil.copy(f32_file, bad)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokens = array_values(read_layout(bad).kv["tokenizer.ggml.tokens"], bad)
    i = next(i for i in range(len(tokens) - 1, 0, -1)
             if i not in tok.added_tokens_decoder and len(tokens[i].encode()) >= 2 and tokens[i].isascii())
    new = tokens[i][::-1] if tokens[i][::-1] != tokens[i] else "Q" * len(tokens[i])
    _edit_string(bad, "tokenizer.ggml.tokens", i, new.encode())
    with pytest.raises(ValidationFailed, match="vocabulary differs") as err:
        validate_gguf(bad, tiny_llama_dir, "F32")
    assert err.value.details["token_id"] == i


def test_a_vocabulary_is_compared_once_per_source_and_a_changed_one_again(f32_file, tiny_llama_dir, tmp_path,
                                                                           monkeypatch):
    """Targets of one conversion carry the same token array: it is decoded and compared once.
    A copy with one token changed has other bytes, so it is compared, and fails."""
    from quantyard.engine.gguf import validate

    compared = []
    real = validate._compare_vocab
    monkeypatch.setattr(validate, "_compare_vocab", lambda *a: compared.append(a[1]) or real(*a))
    monkeypatch.setattr(validate, "_VOCAB_CHECKED", {})
    twin = tmp_path / "twin.gguf"
    shutil.copy(f32_file, twin)
    counts = {validate.check_vocab(read_layout(p), p, tiny_llama_dir) for p in (f32_file, twin, f32_file)}
    assert counts == {512} and compared == [f32_file]
    tokens = array_values(read_layout(twin).kv["tokenizer.ggml.tokens"], twin)
    i = next(i for i in range(len(tokens) - 1, 0, -1) if len(tokens[i]) >= 2 and tokens[i].isascii()
             and tokens[i][::-1] != tokens[i])
    _edit_string(twin, "tokenizer.ggml.tokens", i, tokens[i][::-1].encode())
    with pytest.raises(ValidationFailed, match="vocabulary differs"):
        validate.check_vocab(read_layout(twin), twin, tiny_llama_dir)
    assert compared == [f32_file, twin]


def test_corrupt_chat_template_fails(f32_file, tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.gguf"
    shutil.copy(f32_file, bad)
    template = read_layout(bad).kv["tokenizer.chat_template"].value
    assert isinstance(template, str) and "messages" in template
    _edit_string(bad, "tokenizer.chat_template", None, template.replace("messages", "messagez").encode())
    with pytest.raises(ValidationFailed, match="chat template differs"):
        validate_gguf(bad, tiny_llama_dir, "F32")


def test_missing_chat_template_fails(f32_file, tiny_llama_dir, tmp_path):
    """A template renamed away (same length key) is as wrong as an altered one."""
    bad = tmp_path / "bad.gguf"
    shutil.copy(f32_file, bad)
    data = bytearray(bad.read_bytes())
    key = b"tokenizer.chat_template"
    at = data.index(key)
    data[at:at + len(key)] = b"tokenizer.chat_templatX"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValidationFailed, match="chat template differs"):
        validate_gguf(bad, tiny_llama_dir, "F32")


def test_corrupt_tensor_fails(f32_file, tiny_llama_dir, tmp_path):
    """The output projection's data scrambled: the file parses and loads, its logits drift."""
    layout = read_layout(f32_file)
    t = next(t for t in layout.tensors if t.name in ("output.weight", "token_embd.weight"))
    bad = tmp_path / "bad.gguf"
    shutil.copy(f32_file, bad)
    data = np.memmap(bad, dtype=np.float32, mode="r+", offset=layout.data_offset + t.offset,
                     shape=(t.nbytes // 4,))
    data[:] = np.random.default_rng(0).permutation(np.asarray(data))
    data.flush()
    del data
    with pytest.raises(ValidationFailed, match="drifts from its source"):
        validate_gguf(bad, tiny_llama_dir, "F32")


def test_truncated_file_fails(f32_file, tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(f32_file.read_bytes()[:-4096])
    with pytest.raises(ValidationFailed, match="cannot be re-opened as a GGUF: .*runs past the end"):
        validate_gguf(bad, tiny_llama_dir, "F32")


def test_tokenizer_cache_loads_once_across_threads_and_reloads_on_change(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_text("w")
    cache = TokenizerCache(max_entries=2, loader=lambda p: object())
    seen = []

    def use():
        with cache.use(folder) as tok:
            seen.append(tok)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.loads == 1 and len({id(t) for t in seen}) == 1
    (folder / "model.safetensors").write_text("weights rewritten")  # not a tokenizer file
    use()
    assert cache.loads == 1
    (folder / "tokenizer.json").write_text('{"changed": 1}')
    use()
    assert cache.loads == 2 and seen[-1] is not seen[0]
    for name in ("a", "b", "c"):  # bounded: the oldest folders are dropped
        other = tmp_path / name
        other.mkdir()
        with cache.use(other):
            pass
    assert len(cache._entries) == 2


@pytest.mark.parametrize("family", ARCH_FIXTURES)
def test_vocab_and_template_checks_pass_every_family(family, arch_models, arch_f32_files):
    """The new checks must not fail a correct conversion of any supported tokenizer kind
    (SentencePiece, byte-level BPE, legacy added_tokens_decoder, padded vocabularies)."""
    from quantyard.engine.gguf.validate import check_chat_template, check_vocab, reopen

    layout = reopen(arch_f32_files[family])
    n = check_vocab(layout, arch_f32_files[family], arch_models[family])
    assert n == len(array_values(layout.kv["tokenizer.ggml.tokens"], arch_f32_files[family]))
    check_chat_template(layout, arch_f32_files[family], arch_models[family])


def test_imatrix_load_uses_the_fast_reader_and_agrees_with_gguf_py(tmp_path, monkeypatch):
    import gguf

    from quantyard.engine.gguf.imatrix import ImatrixData, load_imatrix

    rng = np.random.default_rng(0)
    sums = {"blk.0.attn_q.weight": rng.random((1, 256), dtype=np.float32),
            "blk.0.ffn_down_exps.weight": rng.random((4, 512), dtype=np.float32)}
    counts = {"blk.0.attn_q.weight": np.array([96]), "blk.0.ffn_down_exps.weight": np.array([10, 0, 3, 7])}
    path = ImatrixData(sums, counts, datasets=["calib"], chunk_count=3, chunk_size=512).save(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)  # the oracle, read before it is refused below
    want = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}

    def refused(*a, **k):
        raise AssertionError("load_imatrix must not use gguf.GGUFReader")

    monkeypatch.setattr(gguf, "GGUFReader", refused)
    got = load_imatrix(path)
    assert got.datasets == ["calib"] and (got.chunk_count, got.chunk_size) == (3, 512)
    for name in sums:
        assert np.array_equal(got.sums[name].reshape(-1), want[f"{name}.in_sum2"])
        assert np.array_equal(got.counts[name], np.rint(want[f"{name}.counts"]).astype(np.int64))


def _plain_compare(reference: np.ndarray, candidate: np.ndarray, margin: float = 0.02) -> dict[str, float]:
    """compare_logits written out without any shared work (the oracle: a full sort for the
    runner-up, both log-softmaxes computed here)."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    same = reference.argmax(-1) == candidate.argmax(-1)
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > margin
    return {"top1_agreement": float(same.mean()),
            "top1_agreement_decisive": float(same[decisive].mean()) if decisive.any() else 1.0,
            "max_abs_logit_diff": float(np.abs(reference - candidate).max()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}


def test_compare_logits_shares_the_reference_side_and_stays_exact():
    """Several targets against one read-only reference, then a writable reference changed in
    place between comparisons: every result equals the plain computation."""
    from quantyard.engine.gguf.reference import ReferenceOutputs
    from quantyard.engine.gguf.validate import compare_logits

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((40, 3000)).astype(np.float32)
    logits[::4, 7] += 0.01  # near-ties: the decisive mask matters
    shared = ReferenceOutputs(text="x", token_ids=tuple(range(40)), logits=logits).logits
    for noise in (0.01, 0.2, 1.0):
        candidate = (shared + noise * rng.standard_normal(shared.shape)).astype(np.float32)
        assert compare_logits(shared, candidate) == _plain_compare(shared, candidate)
    writable = logits.copy()
    candidate = (writable + 0.1).astype(np.float32)
    assert compare_logits(writable, candidate) == _plain_compare(writable, candidate)
    writable *= 3  # the same array object, other values: nothing stale may be reused
    assert compare_logits(writable, candidate) == _plain_compare(writable, candidate)
