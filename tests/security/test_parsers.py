"""Hostile headers against every upload parser: GGUF (the API's summary and the engine's layout
reader), safetensors, and JSON files (config.json, the shard index, tokenizer files).

Each case asserts the typed error (InvalidModel / NotGGUF / ApiError invalid_model), that the
message names the file and the field, that it carries no server path and no library text, and,
for the allocation bombs, that parsing stayed within a few MB (tracemalloc peak; the file
itself is memory-mapped, never read whole).
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest

from api.errors import ApiError
from api.uploads import check_gguf, check_source_archive
from quantyard import archive, gguf_header
from quantyard.engine.errors import InvalidModel
from quantyard.engine.gguf.gguf_layout import read_layout
from quantyard.engine.hf.safetensors_header import read_safetensors_header
from quantyard.engine.hf.source import load_config, open_source
from quantyard.engine.jsonsafe import load_json_capped
from quantyard.settings import Settings
from tests.security import hostile as h

NEAR = h.NEAR_2_63
MB = 1 << 20
LIBRARY_WORDS = ("Traceback", "RecursionError", "ZeroDivisionError", "UnicodeDecodeError",
                 "struct.error", "KeyError", "JSONDecodeError", "SafetensorError")


def clean(message: str, tmp_path: Path) -> None:
    """A tenant-visible message: no server path, no exception class names from libraries."""
    assert str(tmp_path) not in message and "/tmp" not in message, message
    assert not any(word in message for word in LIBRARY_WORDS), message


def peak_of(fn) -> tuple[BaseException | None, int]:
    """(the exception fn raised, or None; peak bytes Python allocated meanwhile)."""
    tracemalloc.start()
    try:
        try:
            fn()
            exc = None
        except Exception as e:  # noqa: BLE001 - the caller asserts the type
            exc = e
        return exc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------------------- GGUF

_U64, _ARR, _STR, _U8 = 10, 9, 8, 0


def _kv_raw(key: str, vtype: int, payload: bytes) -> bytes:
    return h.gguf_string(key) + struct.pack("<I", vtype) + payload


def _gguf_with_tensor(ne, type_id=0, offset=0, *, data: bytes = b"", kv=()) -> bytes:
    head = h.gguf_file(h.gguf_base_kv() + list(kv), tensors=[h.gguf_tensor_info("t.weight", ne, type_id, offset)])
    return head + bytes(-len(head) % 32) + data


GGUF_CASES = {
    # name: (file bytes, words the message must hold)
    "kv count near 2^63": (h.gguf_file(h.gguf_base_kv(), n_kv=NEAR), "key/value count"),
    "tensor count near 2^63": (h.gguf_file(h.gguf_base_kv(), n_tensors=NEAR), "tensor count"),
    "key length near 2^63": (h.gguf_file([struct.pack("<Q", NEAR) + b"general.x"]), "key name"),
    "string value length near 2^63": (
        h.gguf_file([_kv_raw("general.name", _STR, struct.pack("<Q", NEAR) + b"x")]), "general.name"),
    "array count near 2^63": (h.gguf_array_count(NEAR), "hostile.blob"),
    "string array count near 2^63": (h.gguf_array_count(NEAR, _STR), "hostile.blob"),
    "array count past the file": (h.gguf_array_count(1_000_000), "hostile.blob"),
    "array count past the cap": (h.gguf_array_count(5_000_000), "hostile.blob"),
    "1024 strings of 16 MB claimed": (h.gguf_file([_kv_raw("hostile.strs", _ARR, struct.pack("<IQ", _STR, 1024)
                                                           + (struct.pack("<Q", 1 << 24) + b"x" * 16) * 2)]),
                                      "hostile.strs"),
    "arrays nested 3 deep": (h.gguf_file([_kv_raw("hostile.nest", _ARR, struct.pack("<IQ", _ARR, 1)
                                                  + struct.pack("<IQ", _ARR, 1) + struct.pack("<IQ", _U8, 0))]),
                             "hostile.nest"),
    "unknown value type": (h.gguf_file([_kv_raw("hostile.odd", 77, b"\0" * 8)]), "hostile.odd"),
    "duplicate key": (h.gguf_file(h.gguf_base_kv() + [h.gguf_kv_str("general.name", "again")]),
                      "general.name"),
    "alignment 0": (h.gguf_file(h.gguf_base_kv() + [h.gguf_kv_u32("general.alignment", 0)]),
                    "general.alignment"),
    "alignment not a power of two": (h.gguf_file(h.gguf_base_kv() + [h.gguf_kv_u32("general.alignment", 48)]),
                                     "general.alignment"),
    "5 dimensions": (_gguf_with_tensor([1, 1, 1, 1, 1]), "t.weight"),
    "0 dimensions": (_gguf_with_tensor([]), "t.weight"),
    "a zero dimension": (_gguf_with_tensor([32, 0]), "t.weight"),
    "dims product past 2^63": (_gguf_with_tensor([1 << 40, 1 << 40]), "t.weight"),
    "dimension near 2^64": (_gguf_with_tensor([h.U64_MAX]), "t.weight"),
    "unknown tensor type": (_gguf_with_tensor([32], type_id=99, data=bytes(128)), "t.weight"),
    "row not a whole block": (_gguf_with_tensor([33], type_id=8, data=bytes(128)), "t.weight"),
    "offset past the file": (_gguf_with_tensor([32], offset=1 << 40, data=bytes(128)), "t.weight"),
    "offset near 2^64": (_gguf_with_tensor([32], offset=h.U64_MAX - 31, data=bytes(128)), "t.weight"),
    "misaligned offset": (_gguf_with_tensor([4], offset=4, data=bytes(64)), "t.weight"),
    "tensor data past the end": (_gguf_with_tensor([1024], data=bytes(64)), "t.weight"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_hostile_gguf_headers_are_invalid_models(case, tmp_path):
    data, words = GGUF_CASES[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    exc, peak = peak_of(lambda: read_layout(path))
    assert isinstance(exc, InvalidModel), (case, exc)
    assert "hostile.gguf" in exc.message and words in exc.message, exc.message
    clean(exc.message, tmp_path)
    assert peak < 4 * MB, f"{case}: parsing allocated {peak >> 10} KiB"
    # the API reads uploads with the same reader: a 400 naming the field, never a 500
    with pytest.raises(ApiError) as api:
        check_gguf(path)
    assert (api.value.status, api.value.code) == (400, "invalid_model")
    assert words in api.value.message
    clean(api.value.message, tmp_path)


def test_60m_item_array_costs_the_api_nothing(tmp_path):
    """Issue 10: one 60M-item uint8 array cost the API +486 MB. Refused past the item cap; an
    array under it (4M items) is skipped with one jump, never materialised."""
    path = tmp_path / "big.gguf"
    path.write_bytes(h.gguf_huge_array(60_000_000))
    exc, peak = peak_of(lambda: gguf_header.summary(path))
    assert isinstance(exc, gguf_header.NotGGUF) and "hostile.blob" in str(exc), exc
    assert peak < 2 * MB, peak
    path.write_bytes(h.gguf_huge_array(4_000_000))
    meta = {}
    exc, peak = peak_of(lambda: meta.update(gguf_header.read_metadata(path)))
    assert exc is None and meta["hostile.blob"] == {"array_length": 4_000_000}
    assert peak < 2 * MB, f"read_metadata allocated {peak >> 10} KiB for a 4 MB array"
    assert gguf_header.summary(path)["architecture"] == "llama"


def test_decoded_strings_have_a_budget(tmp_path):
    """Short arrays and string values are decoded: together at most MAX_DECODED_BYTES, so 1,024
    strings of 16 MiB (each under its own cap) cannot make the API hold 16 GiB."""
    from quantyard.engine.gguf.gguf_layout import MAX_DECODED_BYTES

    s = struct.pack("<Q", 12 << 20) + b"x" * (12 << 20)
    path = tmp_path / "strings.gguf"
    path.write_bytes(h.gguf_file(h.gguf_base_kv() + [_kv_raw("hostile.strs", _ARR, struct.pack("<IQ", _STR, 3) + s * 3)]))
    exc, peak = peak_of(lambda: gguf_header.summary(path))
    assert isinstance(exc, gguf_header.NotGGUF) and "hostile.strs" in str(exc) and "add up" in str(exc), exc
    assert peak < MAX_DECODED_BYTES + 8 * MB


@pytest.mark.parametrize("key, value", [
    ("general.file_type", _kv_raw("general.file_type", _ARR, struct.pack("<IQ", _U8, 2) + b"\1\2")),
    ("general.architecture", _kv_raw("general.architecture", 4, struct.pack("<I", 7))),
    ("split.count", _kv_raw("split.count", _STR, h.gguf_string("many"))),
])
def test_summary_fields_of_the_wrong_type_are_refused(key, value, tmp_path):
    kv = [kv for kv in h.gguf_base_kv() if key.encode() not in kv] + [value]
    path = tmp_path / "typed.gguf"
    path.write_bytes(h.gguf_file(kv))
    with pytest.raises(ApiError) as api:
        check_gguf(path)
    assert api.value.code == "invalid_model" and key in api.value.message


def test_a_sane_gguf_still_reads(tmp_path):
    path = tmp_path / "ok.gguf"
    data = bytes(range(128))
    path.write_bytes(_gguf_with_tensor([32], data=data))
    layout = read_layout(path)
    (t,) = layout.tensors
    assert (t.name, t.ne, t.nbytes) == ("t.weight", (32,), 128)
    assert path.read_bytes()[layout.data_offset:layout.data_offset + 128] == data


# --------------------------------------------------------------------------------- safetensors


def _entry(dtype="F32", shape=(4,), offsets=(0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _st(header, data: bytes = bytes(16), *, length=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return h.safetensors_raw(raw, length=length, data=data)


SAFETENSORS_CASES = {
    "header length near 2^63": (_st({"a": _entry()}, length=NEAR), "header length"),
    "header length past the file": (_st({"a": _entry()}, length=10_000), "header length"),
    "end offset near 2^63": (_st({"a": _entry(shape=[NEAR // 4], offsets=[0, NEAR // 4 * 4])}), "past the end"),
    "offset past 2^63": (_st({"a": _entry(offsets=[0, 2**64])}), "data_offsets"),
    "negative offset": (_st({"a": _entry(offsets=[-16, 0])}), "data_offsets"),
    "begin after end": (_st({"a": _entry(offsets=[16, 0])}), "data_offsets"),
    "size not dtype x shape": (_st({"a": _entry(shape=[5])}), "needs"),
    "shape product past 2^63": (_st({"a": _entry(shape=[1 << 40, 1 << 40], offsets=[0, 16])}), "2^63"),
    "out of file": (_st({"a": _entry(shape=[8], offsets=[0, 32])}), "past the end"),
    "overlap": (_st({"a": _entry(offsets=[0, 16]), "b": _entry(offsets=[8, 24])}, bytes(24)), "overlap"),
    "gap before a tensor": (_st({"a": _entry(offsets=[16, 32])}, bytes(32)), "belong to no tensor"),
    "trailing bytes": (_st({"a": _entry()}, bytes(64)), "belong to no tensor"),
    "bool as a dimension": (_st({"a": _entry(shape=[True, 4], offsets=[0, 16])}), "shape"),
    "9 dimensions": (_st({"a": _entry(shape=[1] * 8 + [4])}), "shape"),
    "dtype not a string": (_st({"a": {**_entry(), "dtype": ["F32"]}}), "dtype"),
    "header is a list": (_st([1, 2, 3]), "not an object"),
    "duplicate tensor name": (_st(b'{"a":' + json.dumps(_entry()).encode() + b',"a":'
                                  + json.dumps(_entry()).encode() + b"}"), "more than once"),
    "100k-deep header": (_st(h.deep_json(100_000)), "nests"),
    "5000-digit number": (_st(b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,16]}}'),
                          "number"),
    "not UTF-8": (_st(b'{"\xff\xfe":1}'), "UTF-8"),
    "metadata not strings": (_st({"__metadata__": {"format": {"x": 1}}, "a": _entry()}), "__metadata__"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_hostile_safetensors_headers_are_invalid_models(case, tmp_path):
    data, words = SAFETENSORS_CASES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    exc, peak = peak_of(lambda: read_safetensors_header(path))
    assert isinstance(exc, InvalidModel), (case, exc)
    assert "model.safetensors" in exc.message and words in exc.message, exc.message
    assert exc.details == {"file": "model.safetensors"}
    clean(exc.message, tmp_path)
    assert peak < 8 * MB, f"{case}: parsing allocated {peak >> 10} KiB"


@pytest.mark.parametrize("case", ["overlap", "gap before a tensor", "trailing bytes", "out of file",
                                  "size not dtype x shape", "begin after end"])
def test_the_reference_reader_refuses_them_too(case, tmp_path):
    """Differential check against safetensors itself: what we refuse at preflight it would
    refuse later (as SafetensorError, an internal_error before)."""
    from safetensors import SafetensorError, safe_open

    path = tmp_path / "model.safetensors"
    path.write_bytes(SAFETENSORS_CASES[case][0])
    with pytest.raises(SafetensorError):
        with safe_open(path, framework="np") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_safetensors_through_preflight(tiny_llama_dir, tmp_path):
    """The same refusal reaches preflight, for a real model whose weights file is hostile."""
    from quantyard.engine import parse_target, preflight

    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    (model / "model.safetensors").write_bytes(SAFETENSORS_CASES["offset past 2^63"][0])
    with pytest.raises(InvalidModel) as exc:
        preflight(model, [parse_target("gguf:Q8_0")])
    assert "model.safetensors" in exc.value.message
    clean(exc.value.message, tmp_path)


# ---------------------------------------------------------------------------------------- JSON

HOSTILE_JSON = {
    "100k-deep": (h.deep_json(100_000), "nests"),
    "100k-deep arrays": (b"[" * 100_000 + b"]" * 100_000, "nests"),
    "5000-digit integer": (b'{"vocab_size": ' + b"7" * 5000 + b"}", "number"),
    "not UTF-8": (b'{"model_type": "\xc3\x28"}', "UTF-8"),
    "duplicate key": (b'{"architectures": ["LlamaForCausalLM"], "architectures": ["Evil"]}', "more than once"),
    "a list": (b"[1, 2]", "not a JSON object"),
    "truncated": (b'{"model_type": "llama"', "not valid JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE_JSON))
def test_hostile_config_json_is_invalid_model_everywhere(case, tmp_path):
    """config.json is read by the API (from the archive) and by the engine (from the unpacked
    folder): the same refusal, naming config.json, in both; never a RecursionError 500."""
    raw, words = HOSTILE_JSON[case]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(raw)
    with pytest.raises(InvalidModel) as engine_exc:
        load_config(folder)
    assert "config.json" in engine_exc.value.message and words in engine_exc.value.message
    clean(engine_exc.value.message, tmp_path)

    upload = tmp_path / "upload.tar.gz"
    upload.write_bytes(h.tar_of({"config.json": raw, "model.safetensors": b"x"}))
    with pytest.raises(ApiError) as api:
        check_source_archive(upload, Settings(data_dir=tmp_path / "data"))
    assert (api.value.status, api.value.code) == (400, "invalid_model")
    assert "config.json" in api.value.message and words in api.value.message
    clean(api.value.message, tmp_path)


def test_deep_json_is_refused_before_parsing():
    """The depth check runs on the bytes: even with a raised recursion limit the parser never
    sees the nesting (no C-stack overflow)."""
    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1_000_000)
    try:
        with pytest.raises(InvalidModel, match="nests arrays/objects more than 64 deep"):
            load_json_capped(b"[" * 100_001 + b"]" * 100_001, name="config.json")
    finally:
        sys.setrecursionlimit(old)
    # strings holding brackets are not nesting
    assert load_json_capped(json.dumps({"a": "[[[[" * 1000}).encode(), name="x.json") == {"a": "[[[[" * 1000}


def _random_json(rng, depth: int):
    """A random JSON value nesting at most `depth` deep, with strings full of brackets, quotes
    and backslashes (what a depth scan must not count)."""
    if depth == 0 or rng.random() < 0.3:
        return rng.choice([1, None, True, "".join(rng.choice('[]{}"\\ab:,') for _ in range(rng.randint(0, 8)))])
    items = [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return items if rng.random() < 0.5 else {f"k{i}[{{\\": v for i, v in enumerate(items)}


def _nesting(value) -> int:
    if isinstance(value, list):
        return 1 + max((_nesting(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_nesting(v) for v in value.values()), default=0)
    return 0


def test_json_depth_equals_the_parsed_nesting():
    """Oracle: the nesting of what json.loads builds, on 3,000 random documents."""
    import random

    from quantyard.engine.jsonsafe import json_depth, nests_deeper_than

    rng = random.Random(7)
    for _ in range(3000):
        value = _random_json(rng, rng.randint(0, 9))
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
        assert json_depth(text) == _nesting(value), text
        assert nests_deeper_than(text, 3) == (_nesting(value) > 3)


def test_config_json_size_cap(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(b'{"a": "' + b"x" * (5 * MB) + b'"}')
    exc, peak = peak_of(lambda: load_config(folder))
    assert isinstance(exc, InvalidModel) and "larger than" in exc.message
    assert peak < MB  # refused from its size, not read


def test_tokenizer_json_is_parsed_with_caps(tmp_path):
    from quantyard.engine.gguf.vocab import tokenizer_config

    (tmp_path / "tokenizer_config.json").write_bytes(h.deep_json(100_000))
    with pytest.raises(InvalidModel) as exc:
        tokenizer_config(tmp_path)
    assert "tokenizer_config.json" in exc.value.message
    clean(exc.value.message, tmp_path)


@pytest.mark.parametrize("shard", ["../../../etc/passwd", "/etc/passwd", "sub/model.safetensors",
                                   "..\\model.safetensors", ".hidden"])
def test_index_cannot_name_files_outside_the_model(shard, tiny_llama_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    names, _ = read_safetensors_header(model / "model.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    with pytest.raises(InvalidModel) as exc:
        open_source(model)
    assert "model.safetensors.index.json" in exc.value.message
    clean(exc.value.message, tmp_path)


def test_archive_config_reader_refuses_deep_json(tmp_path):
    path = tmp_path / "a.zip"
    path.write_bytes(h.zip_of({"config.json": h.deep_json(100_000)}))
    members = archive.inspect_archive(path, max_members=10, max_unpacked_bytes=1 << 30)
    with pytest.raises(ValueError, match="config.json nests"):
        archive.read_model_config(path, members)


def test_a_corrupt_sentencepiece_model_is_invalid_model(tmp_path):
    """sentencepiece's own error names the server path; ours names the file."""
    from quantyard.engine.gguf.vocab import sentencepiece_vocab

    (tmp_path / "tokenizer.model").write_bytes(b"\xff" * 100)
    with pytest.raises(InvalidModel) as exc:
        sentencepiece_vocab(tmp_path, None)
    assert "tokenizer.model" in exc.value.message
    clean(exc.value.message, tmp_path)


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 1_000_000), ("vocab_size", 10**12),
                                          ("hidden_size", 10**9), ("num_attention_heads", 0)])
def test_absurd_config_sizes_are_refused_at_upload(field, value, tmp_path):
    """The caps need no tensors: the API refuses them before the upload is stored."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", field: value}
    upload = tmp_path / "upload.tar.gz"
    upload.write_bytes(h.tar_of({"config.json": json.dumps(config).encode(), "model.safetensors": b"x"}))
    with pytest.raises(ApiError) as api:
        check_source_archive(upload, Settings(data_dir=tmp_path / "data"))
    assert (api.value.status, api.value.code) == (400, "invalid_model")
    assert api.value.message.startswith(f"config.json: {field} is {value}")
    assert api.value.details == {"file": "config.json", "field": field}


def test_a_program_sources_inputs_json_is_parsed_with_caps(tmp_path):
    from quantyard.engine.onnx.program import ProgramSource, declared_specs
    from quantyard.engine.onnx.program_files import INPUTS_FILE

    (tmp_path / INPUTS_FILE).write_bytes(h.deep_json(100_000))
    src = ProgramSource(root=tmp_path, kind="torch.export", model_file="model.pt2", inputs_json=True)
    with pytest.raises(InvalidModel) as exc:
        declared_specs(src, {})
    assert INPUTS_FILE in exc.value.message and "nests" in exc.value.message
    clean(exc.value.message, tmp_path)
