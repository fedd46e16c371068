"""gguf_layout's tight loop over long string arrays (the vocabulary) keeps every check of the
string-by-string walk: lengths capped, nothing read past the end; the values it skips are still
there for array_values."""

from __future__ import annotations

import struct

import pytest

from quantyard.engine.errors import InvalidModel
from quantyard.engine.gguf import gguf_layout as gl
from quantyard.engine.gguf.gguf_output import ARRAY, STRING, encode_kv, write_header


def _file(tmp_path, kv: list[bytes]):
    path = tmp_path / "m.gguf"
    with open(path, "wb") as f:
        write_header(f, kv, [], 32)
    return path


def _strings(n: int) -> list[str]:
    return [f"tok{i}\u00e9" for i in range(n)]


def test_long_string_array_is_skipped_and_decoded_on_demand(tmp_path):
    tokens = _strings(gl.MAX_DECODED_ARRAY * 3 + 7)
    path = _file(tmp_path, [encode_kv("general.architecture", STRING, "llama"),
                            encode_kv("tokenizer.ggml.tokens", ARRAY, tokens, STRING),
                            encode_kv("general.alignment", 4, 32)])
    layout = gl.read_layout(path)
    pair = layout.kv["tokenizer.ggml.tokens"]
    assert pair.value is None and pair.array_length == len(tokens)
    assert layout.kv["general.alignment"].value == 32  # the cursor landed exactly after the array
    assert gl.array_values(pair, path) == tokens


def _raw_array(strings: list[bytes], lengths: list[int]) -> bytes:
    body = b"".join(struct.pack("<Q", n) + s for s, n in zip(strings, lengths, strict=True))
    key = b"tokenizer.ggml.tokens"
    return struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", ARRAY, STRING, len(strings)) + body


def _hostile(tmp_path, raw_kv: bytes):
    path = tmp_path / "h.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + raw_kv)
    return path


def test_a_string_past_the_end_is_refused(tmp_path):
    n = gl.MAX_DECODED_ARRAY + 5
    strings = [b"ab"] * n
    lengths = [2] * (n - 1) + [1 << 20]  # the last claims a MiB the file does not have
    with pytest.raises(InvalidModel, match="runs past the end of the file"):
        gl.read_layout(_hostile(tmp_path, _raw_array(strings, lengths)))


def test_an_oversized_string_is_refused(tmp_path):
    n = gl.MAX_DECODED_ARRAY + 5
    lengths = [2] * 3 + [gl.MAX_STRING_BYTES + 1] + [2] * (n - 4)
    with pytest.raises(InvalidModel, match="more than the .* allowed"):
        gl.read_layout(_hostile(tmp_path, _raw_array([b"ab"] * n, lengths)))


def test_a_truncated_array_is_refused(tmp_path):
    n = gl.MAX_DECODED_ARRAY + 5
    raw = _raw_array([b"ab"] * n, [2] * n)
    with pytest.raises(InvalidModel, match="ends early|runs past|more than the rest"):
        gl.read_layout(_hostile(tmp_path, raw[:-9]))
