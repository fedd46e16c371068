"""Builders of hostile uploads: archives, GGUF and safetensors headers, configs, pickles, programs.

Everything is made in memory as bytes (archives) or from a real tiny model folder (dict of file
name -> bytes), so each test case states its attack in one line. Pickles that run code write a
marker file whose path the test owns: if the marker ever exists, code from an upload ran.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

from tests.api import archives

U64_MAX = 2**64 - 1
NEAR_2_63 = 2**63 - 1

# ---------------------------------------------------------------------------------------- pickles


class WritesMarker:
    """Unpickling this runs a shell command that creates `marker` (the exploit of issue 10)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def marker_pickle(marker: Path) -> bytes:
    """A plain pickle (protocol 2, as torch.save's legacy format starts) that writes `marker`."""
    return pickle.dumps({"weight": WritesMarker(marker)}, protocol=2)


def marker_torch_save(marker: Path) -> bytes:
    """torch.save (zip format) of a state dict whose one value writes `marker` when unpickled."""
    import torch

    buf = io.BytesIO()
    torch.save({"model.embed_tokens.weight": WritesMarker(marker)}, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- archives


def folder_files(path: Path) -> dict[str, bytes]:
    """The regular files of a model folder, by name (what an upload of that folder holds)."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


def tar_of(files: dict[str, bytes], *, prefix: str = "", mode: str = "w:gz", extra=()) -> bytes:
    """A tar (mode "w") or tar.gz ("w:gz") of `files` under `prefix`, plus raw (TarInfo, data)."""
    buf = io.BytesIO()
    level = {"compresslevel": 1} if mode == "w:gz" else {}
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT, **level) as tf:
        for name, data in files.items():
            ti, payload = archives.file_member(prefix + name, data)
            tf.addfile(ti, io.BytesIO(payload))
        for ti, data in extra:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def zip_of(files: dict[str, bytes], *, extra: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = target
    return ti, None


def tar_absolute() -> bytes:
    return archives.model_tar_gz(extra=[archives.file_member("/etc/cron.d/quantyard-evil", b"* * * * * true")])


def tar_hardlink_out() -> bytes:
    return archives.model_tar_gz(extra=[_link("passwd", "../../../../etc/passwd", tarfile.LNKTYPE)])


def tar_symlink_then_write() -> bytes:
    """A symlink to a folder outside, then a file written "through" it (the classic two-step)."""
    return archives.model_tar_gz(extra=[_link("escape", "/tmp", tarfile.SYMTYPE),
                                        archives.file_member("escape/quantyard-evil", b"pwned")])


def tar_block_device() -> bytes:
    dev = tarfile.TarInfo("sda")
    dev.type = tarfile.BLKTYPE
    dev.devmajor, dev.devminor = 8, 0
    return archives.model_tar_gz(extra=[(dev, None)])


def plain_tar_traversal() -> bytes:
    """The same `../` member in an uncompressed tar (another code path than tar.gz)."""
    files = {**archives.model_files(), "../../quantyard-evil": b"pwned"}
    return tar_of(files, mode="w")


def zip_member(name: str, data: bytes = b"pwned") -> bytes:
    return zip_of(archives.model_files(), extra=[(zipfile.ZipInfo(name), data)])


# Hand-made zips: the bombs below are far too large to compress for real in a test.

def _local_header(name: bytes, crc: int, csize: int, usize: int, method: int) -> bytes:
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, crc, csize, usize,
                       len(name), 0) + name


def _central_entry(name: bytes, crc: int, csize: int, usize: int, method: int, offset: int) -> bytes:
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, csize, usize,
                       len(name), 0, 0, 0, 0, 0, offset) + name


def _end_records(count: int, cd_size: int, cd_offset: int) -> bytes:
    """End of central directory; zip64 records when `count` does not fit 16 bits."""
    if count < 0xFFFF:
        return struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, cd_size, cd_offset, 0)
    zip64_at = cd_offset + cd_size
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, zip64_at, 1)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return record + locator + end


def zip_bomb(unpacked: int = 2 << 30, chunk: int = 64 << 20) -> bytes:
    """A ~2 MB zip whose one member (model.safetensors) inflates to `unpacked` bytes of zeros.

    One deflate chunk of `chunk` zeros ends with a full flush (no back-references across it), so
    repeating its bytes is a valid stream of that many chunks; the final empty block closes it."""
    zeros = bytes(chunk)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush(zlib.Z_FINISH)
    n = unpacked // chunk
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(zeros, crc)
    data = block * n + tail
    files = archives.model_files()
    out = bytearray()
    central = bytearray()
    for name, payload in [(k.encode(), v) for k, v in files.items() if k != "model.safetensors"]:
        central += _central_entry(name, zlib.crc32(payload), len(payload), len(payload), 0, len(out))
        out += _local_header(name, zlib.crc32(payload), len(payload), len(payload), 0) + payload
    name = b"model.safetensors"
    central += _central_entry(name, crc, len(data), n * chunk, 8, len(out))
    out += _local_header(name, crc, len(data), n * chunk, 8) + data
    return bytes(out + central + _end_records(len(files), len(central), len(out)))


def zip_million_members(count: int = 1_000_000) -> bytes:
    """A zip whose central directory lists `count` empty members (~50 MB, all sharing one local
    header: a reader that builds every entry before checking the count pays for all of them)."""
    local = _local_header(b"f0000000", 0, 0, 0, 0)
    parts = [_central_entry(b"f%07d" % i, 0, 0, 0, 0, 0) for i in range(count)]
    central = b"".join(parts)
    return local + central + _end_records(count, len(central), len(local))


def tar_gz_bomb(unpacked: int = 2 << 30, chunk: int = 64 << 20) -> bytes:
    """A ~2 MB tar.gz whose model.safetensors member is `unpacked` bytes of zeros: the gzip
    stream is many members (concatenated gzip is valid), each inflating to `chunk` zeros."""
    import gzip

    head = b""
    for name, data in archives.model_files().items():
        if name != "model.safetensors":
            ti, payload = archives.file_member(name, data)
            head += ti.tobuf(format=tarfile.GNU_FORMAT) + payload + bytes(-len(payload) % 512)
    big = tarfile.TarInfo("model.safetensors")
    big.size = unpacked
    head += big.tobuf(format=tarfile.GNU_FORMAT)
    zeros = gzip.compress(bytes(chunk), compresslevel=9, mtime=0)
    return gzip.compress(head, mtime=0) + zeros * (unpacked // chunk) + gzip.compress(bytes(1024), mtime=0)


# ---------------------------------------------------------------------------------------- GGUF

_U32, _STR, _ARR, _U8 = 4, 8, 9, 0


def gguf_string(s: bytes | str) -> bytes:
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def gguf_kv_str(key: str, value: str) -> bytes:
    return gguf_string(key) + struct.pack("<I", _STR) + gguf_string(value)


def gguf_kv_u32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<I", _U32) + struct.pack("<I", value)


def gguf_file(kv: list[bytes], *, tensors: list[bytes] = (), n_kv: int | None = None,
              n_tensors: int | None = None, tail: bytes = b"") -> bytes:
    """A GGUF v3 header with the given raw key/values and tensor infos; counts may lie."""
    head = struct.pack("<4sIQQ", b"GGUF", 3, len(tensors) if n_tensors is None else n_tensors,
                       len(kv) if n_kv is None else n_kv)
    return head + b"".join(kv) + b"".join(tensors) + tail


def gguf_base_kv() -> list[bytes]:
    return [gguf_kv_str("general.architecture", "llama"), gguf_kv_str("general.name", "hostile"),
            gguf_kv_u32("general.file_type", 0)]


def gguf_tensor_info(name: str, ne: list[int], type_id: int = 0, offset: int = 0) -> bytes:
    return (gguf_string(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
            + struct.pack("<IQ", type_id, offset))


def gguf_huge_array(items: int = 60_000_000) -> bytes:
    """A valid GGUF whose header holds one uint8 array of `items` elements (60 MB)."""
    array = gguf_string("hostile.blob") + struct.pack("<IIQ", _ARR, _U8, items) + bytes(items)
    return gguf_file(gguf_base_kv() + [array])


def gguf_array_count(count: int, item_type: int = _U8) -> bytes:
    """An array that claims `count` items and holds a handful."""
    array = gguf_string("hostile.blob") + struct.pack("<IIQ", _ARR, item_type, count) + bytes(64)
    return gguf_file(gguf_base_kv() + [array])


# ---------------------------------------------------------------------------------------- safetensors


def safetensors_raw(header: bytes, *, length: int | None = None, data: bytes = b"") -> bytes:
    """A safetensors file from raw header bytes; `length` may lie about the header's size."""
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def safetensors_one(name: str, dtype: str, shape: list[int], offsets: list[int], data: bytes = b"") -> bytes:
    header = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": offsets}}).encode()
    return safetensors_raw(header, data=data)


def deep_json(depth: int = 100_000) -> bytes:
    """`depth` nested objects: {"a": {"a": ... 1 ...}} (deeper than any parser's recursion)."""
    return b'{"a":' * depth + b"1" + b"}" * depth


# ---------------------------------------------------------------------------------------- models


def with_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(files["config.json"])
    config.update(changes)
    return {**files, "config.json": json.dumps(config).encode()}


def nan_model(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same model with NaN in one weight (the final norm's first element)."""
    import torch
    from safetensors.torch import load, save

    tensors = load(files["model.safetensors"])
    name = "model.norm.weight" if "model.norm.weight" in tensors else sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = torch.nan
    return {**files, "model.safetensors": save(tensors, metadata={"format": "pt"})}


def llama_config_over_gpt2(gpt2_files: dict[str, bytes]) -> dict[str, bytes]:
    """GPT-2's tensors (wte, h.0.attn.c_attn, ...) under a config that says LlamaForCausalLM of
    the same size: nothing in the weights is what a Llama loads."""
    gpt2 = json.loads(gpt2_files["config.json"])
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": gpt2["vocab_size"],
              "hidden_size": gpt2["n_embd"], "intermediate_size": 4 * gpt2["n_embd"],
              "num_hidden_layers": gpt2["n_layer"], "num_attention_heads": gpt2["n_head"],
              "num_key_value_heads": gpt2["n_head"], "max_position_embeddings": gpt2["n_positions"],
              "rms_norm_eps": 1e-5, "bos_token_id": gpt2.get("bos_token_id"),
              "eos_token_id": gpt2.get("eos_token_id"), "tie_word_embeddings": True, "torch_dtype": "float32"}
    return {**gpt2_files, "config.json": json.dumps(config).encode()}


def huge_tokenizer_json(tokens: int = 1_000_000) -> bytes:
    """A well-formed BPE tokenizer.json with `tokens` entries (far past the model's vocab_size)."""
    vocab = ",".join(f'"t{i}":{i}' for i in range(tokens))
    return (b'{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,'
            b'"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,'
            b'"use_regex":true},"post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":true,'
            b'"trim_offsets":true,"use_regex":true},'
            b'"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,'
            b'"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"vocab":{'
            + vocab.encode() + b'},"merges":[]}}')


# ---------------------------------------------------------------------------------------- programs


def tiny_pt2() -> bytes:
    import tempfile

    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.pt2"
        torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), path)
        return path.read_bytes()


def tiny_torchscript() -> bytes:
    import tempfile

    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.pt"
        torch.jit.save(torch.jit.script(model), path)
        return path.read_bytes()


def rezip(data: bytes, *, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None) -> bytes:
    """The zip `data` with members replaced (by name after the top folder) and members added."""
    replace, add = replace or {}, add or {}
    src = zipfile.ZipFile(io.BytesIO(data))
    top = src.namelist()[0].split("/", 1)[0]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            part = info.filename[len(top) + 1:]
            out.writestr(info.filename, replace.get(part, src.read(info)))
        for part, payload in add.items():
            out.writestr(f"{top}/{part}", payload)
    return buf.getvalue()


def pt2_legacy_weights(marker: Path) -> bytes:
    """Issue 10's exploit: `data/weights/model.pt` (a pickle that writes `marker`) declared in
    model_weights_config.json with use_pickle: false, which the vetting skipped and
    torch.export.load unpickles with weights_only=False."""
    pt2 = tiny_pt2()
    src = zipfile.ZipFile(io.BytesIO(pt2))
    top = src.namelist()[0].split("/", 1)[0]
    config = json.loads(src.read(f"{top}/data/weights/model_weights_config.json"))
    meta = dict(next(iter(config["config"].values())))
    config["config"]["legacy"] = {**meta, "path_name": "model.pt", "use_pickle": False}
    return rezip(pt2, replace={"data/weights/model_weights_config.json": json.dumps(config).encode()},
                 add={"data/weights/model.pt": marker_torch_save(marker)})


def pt2_pickled_part(marker: Path, folder: str) -> bytes:
    """A pickle that writes `marker` where torch.export.save puts pickled parts (`folder` is
    data/weights, data/constants or data/sample_inputs), declared as use_pickle: true."""
    pt2 = tiny_pt2()
    src = zipfile.ZipFile(io.BytesIO(pt2))
    top = src.namelist()[0].split("/", 1)[0]
    if folder == "data/sample_inputs":
        return rezip(pt2, replace={"data/sample_inputs/model.pt": marker_torch_save(marker)})
    kind = folder.rsplit("/", 1)[1]
    config_name = f"{folder}/model_{kind}_config.json"
    config = json.loads(src.read(f"{top}/{config_name}"))
    config.setdefault("config", {})["evil"] = {"path_name": "evil_0", "is_param": False, "use_pickle": True}
    return rezip(pt2, replace={config_name: json.dumps(config).encode()},
                 add={f"{folder}/evil_0": marker_torch_save(marker)})


def pt2_with_native_code() -> bytes:
    """An AOTInductor part: a shared library torch.export.load would dlopen."""
    return rezip(tiny_pt2(), add={"data/aotinductor/model/model.so": b"\x7fELF" + bytes(60)})


def torchscript_pickle(marker: Path, member: str) -> bytes:
    """A TorchScript archive whose `member` (data.pkl or constants.pkl) is a Python pickle that
    writes `marker`."""
    return rezip(tiny_torchscript(), replace={member: pickle.dumps(WritesMarker(marker), protocol=2)})


def onnx_external(location: str, *, length: int | None = None) -> dict[str, bytes]:
    """A one-MatMul .onnx whose weight lives in external data at `location` (+ a real w.bin)."""
    from onnx import TensorProto, helper

    weight = TensorProto()
    weight.name, weight.data_type = "w", TensorProto.FLOAT
    weight.dims.extend([4, 4])
    weight.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0", "length": str(64 if length is None else length)}
    for key, value in entries.items():
        e = weight.external_data.add()
        e.key, e.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return {"model.onnx": model.SerializeToString(), "w.bin": bytes(64)}


# ---------------------------------------------------------------------------------------- corrupt zips
# Found by fuzz/fuzz_archive.py: zipfile raises its own errors (BadZipFile, zlib.error,
# NotImplementedError, UnicodeDecodeError) from places the archive checks did not wrap.


def _stored_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_bad_crc() -> bytes:
    """config.json's bytes changed after its CRC-32 was written."""
    data = _stored_zip(archives.model_files())
    return data.replace(b'"model_type": "llama"', b'"model_type": "llamb"', 1)


def zip_name_not_utf8() -> bytes:
    """A member name flagged UTF-8 (bit 11) whose bytes are not UTF-8."""
    data = _stored_zip({**archives.model_files(), "caf\u00e9.txt": b"x"})
    return data.replace("caf\u00e9".encode(), b"caf\xc3\x28")


def zip_strong_encryption_flag() -> bytes:
    """config.json's central entry says "strong encryption" (flag bit 6), not bit 0."""
    data = bytearray(_stored_zip(archives.model_files()))
    at = data.find(b"PK\x01\x02")
    while at != -1:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46:at + 46 + name_len]) == b"config.json":
            struct.pack_into("<H", data, at + 8, 0x40)
        at = data.find(b"PK\x01\x02", at + 4)
    return bytes(data)


def pt2_name_not_utf8() -> bytes:
    """A .pt2 with an extra member whose name is flagged UTF-8 but is not (fuzz_program_vetting)."""
    return rezip(tiny_pt2(), add={"extra/caf\u00e9": b"x"}).replace("caf\u00e9".encode(), b"caf\xc3\x28")


def pt2_bad_crc() -> bytes:
    """A stored .pt2 whose byteorder member changed after its CRC-32 was written."""
    data = rezip(tiny_pt2())
    assert data.count(b"/byteorderlittle") == 1  # the local header's name, then the stored bytes
    return data.replace(b"/byteorderlittle", b"/byteorderelttil")
