"""Hostile program uploads (.pt2, TorchScript, .bin) through the engine API (preflight and
convert): each is a genuine torch.export.save / torch.jit.save archive edited one way, most
carrying a pickle whose __reduce__ runs `touch <marker>`, in every place an archive can hold
one. Each must end in invalid_model naming the member, with no marker, no artifact, and this
process alive; torch's own loader running the payload (in this test's tmp dir) proves the
first, known exploit is real."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shlex
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from quantyard import engine
from quantyard.engine.errors import ConversionError, InvalidModel

TOP = "prog"  # the archive folder torch.export.save wrote (the file's stem)


class WritesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def marker_pickle(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps({"w": WritesMarker(marker)}, protocol=protocol)


def marker_torch_save(marker: Path) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": WritesMarker(marker)}, buf)
    return buf.getvalue()


def _module():
    import torch

    torch.manual_seed(0)

    class WithConstants(torch.nn.Module):
        """Parameters (weights), a buffer and a plain tensor attribute (a lifted constant)."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 4)
            self.register_buffer("scale", torch.full((4,), 0.5))
            self.offset = torch.arange(4, dtype=torch.float32)

        def forward(self, x):
            return self.linear(x) * self.scale + self.offset

    return WithConstants().eval()


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> dict[str, bytes]:
    return make_genuine(tmp_path_factory.mktemp("genuine"))


def make_genuine(root: Path) -> dict[str, bytes]:
    """A .pt2 with weights, constants and sample inputs, and a TorchScript archive."""
    import torch

    module = _module()
    program = torch.export.export(module, (torch.randn(2, 8),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, root / f"{TOP}.pt2")
    torch.jit.script(module).save(str(root / "model.pt"))
    with zipfile.ZipFile(root / f"{TOP}.pt2") as zf:
        names = zf.namelist()
    assert f"{TOP}/data/constants/tensor_0" in names and f"{TOP}/data/sample_inputs/model.pt" in names
    return {"pt2": (root / f"{TOP}.pt2").read_bytes(), "ts": (root / "model.pt").read_bytes()}


def rezip(data: bytes, *, replace: dict[str, bytes] | None = None, add: list[tuple[str, bytes]] = (),
          drop: tuple[str, ...] = (), compress: dict[str, int] | None = None) -> bytes:
    """The archive with members replaced or dropped (names relative to its top folder) and
    members added (`add`: names used exactly as given, traversal included)."""
    replace, compress = replace or {}, compress or {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        top = src.namelist()[0].split("/", 1)[0]
        for name in src.namelist():
            rel = name[len(top) + 1:]
            if rel in drop:
                continue
            dst.writestr(name, replace.get(rel, src.read(name)), compress_type=compress.get(rel, zipfile.ZIP_STORED))
        for name, payload in add:
            dst.writestr(name, payload, compress_type=compress.get(name, zipfile.ZIP_STORED))
    return out.getvalue()


def edit_json(data: bytes, member: str, change: Callable[[dict], None]) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        doc = json.loads(zf.read(f"{TOP}/{member}"))
    change(doc)
    return rezip(data, replace={member: json.dumps(doc).encode()})


def _entry(config: dict, **changes) -> dict:
    return {**next(iter(config["config"].values())), **changes}


def weights_entry(path_name: str, use_pickle: bool, folder: str = "weights"):
    config = "data/weights/model_weights_config.json" if folder == "weights" else \
        "data/constants/model_constants_config.json"

    def change(doc: dict) -> None:
        doc["config"]["evil"] = _entry(doc, path_name=path_name, use_pickle=use_pickle)

    return config, change


# ------------------------------------------------------------------------------- the cases

# (id, builder(genuine, marker) -> .pt2 bytes, reason, member the error must name)
def _legacy_declared(g, m):
    config, change = weights_entry("model.pt", use_pickle=False)
    return rezip(edit_json(g["pt2"], config, change), add=[(f"{TOP}/data/weights/model.pt", marker_pickle(m))])


def _pickled_entry(folder: str, file: str):
    def build(g, m):
        config, change = weights_entry(file, use_pickle=True, folder=folder)
        return rezip(edit_json(g["pt2"], config, change), add=[(f"{TOP}/data/{folder}/{file}", marker_torch_save(m))])
    return build


def _object_entry(prefix: str):
    def build(g, m):
        def change(doc):
            doc["config"]["evil"] = {"path_name": f"{prefix}0", "is_param": False, "use_pickle": True,
                                     "tensor_meta": None}
        data = edit_json(g["pt2"], "data/constants/model_constants_config.json", change)
        return rezip(data, add=[(f"{TOP}/data/constants/{prefix}0", marker_pickle(m))])
    return build


def _expr(g, m):
    with zipfile.ZipFile(io.BytesIO(g["pt2"])) as zf:
        program = zf.read(f"{TOP}/models/model.json")
    sym = program[program.index(b"Symbol('"):].split(b'"', 1)[0]
    evil = f"__import__('os').system('touch {m}') or ".encode() + sym
    return rezip(g["pt2"], replace={"models/model.json": program.replace(sym, evil, 1)})


FQN_INJECTION = 'linear.x") or __import__("os").system("touch {m}") or ("'


def _fqn(g, m):
    """An attribute path torch.fx would paste into the Python it generates (getattr(self, "<it>"))."""
    evil = FQN_INJECTION.format(m=m)

    def program(doc):
        for spec in doc["graph_module"]["signature"]["input_specs"]:
            if spec.get("parameter", {}).get("parameter_name") == "linear.weight":
                spec["parameter"]["parameter_name"] = evil

    def config(doc):
        doc["config"][evil] = doc["config"].pop("linear.weight")

    return edit_json(edit_json(g["pt2"], "models/model.json", program), "data/weights/model_weights_config.json",
                     config)


def _node_target(g, m):
    with zipfile.ZipFile(io.BytesIO(g["pt2"])) as zf:
        program = zf.read(f"{TOP}/models/model.json")
    evil = json.dumps(f'torch.ops.aten.add.Tensor") or __import__("os").system("touch {m}") or ("').encode()
    return rezip(g["pt2"], replace={"models/model.json": program.replace(b'"torch.ops.aten.add.Tensor"', evil, 1)})


def _payload_rewrite(member: str, payload: Callable[[Path], bytes]):
    return lambda g, m: rezip(g["pt2"], replace={member: payload(m)})


def _bad_crc(data: bytes) -> bytes:
    """One byte of the stored program JSON changed after its CRC was written (still valid JSON)."""
    at = data.index(b'"graph_module"')
    return data[:at] + b'"graph_modulf"' + data[at + len(b'"graph_module"'):]


PT2_CASES = [
    # the exploit of issue 10: a weights entry naming data/weights/model.pt, use_pickle false
    ("legacy-weights-declared", _legacy_declared, "unsafe_pickle", f"{TOP}/data/weights/model.pt"),
    ("legacy-weights", lambda g, m: rezip(g["pt2"], add=[(f"{TOP}/data/weights/model.pt", marker_pickle(m))]),
     "unsafe_pickle", f"{TOP}/data/weights/model.pt"),
    ("legacy-constants", lambda g, m: rezip(g["pt2"], add=[(f"{TOP}/data/constants/model.pt", marker_torch_save(m))]),
     "unsafe_pickle", f"{TOP}/data/constants/model.pt"),
    ("pickled-weight", _pickled_entry("weights", "weight_9"), "unsafe_pickle", f"{TOP}/data/weights/weight_9"),
    ("pickled-constant", _pickled_entry("constants", "tensor_9"), "unsafe_pickle", f"{TOP}/data/constants/tensor_9"),
    ("custom-object", _object_entry("custom_obj_"), "unsafe_pickle", f"{TOP}/data/constants/custom_obj_0"),
    ("opaque-object", _object_entry("opaque_obj_"), "unsafe_pickle", f"{TOP}/data/constants/opaque_obj_0"),
    ("raw-weight-is-a-pickle", _payload_rewrite("data/weights/weight_0", marker_pickle), None, None),
    ("sample-inputs", _payload_rewrite("data/sample_inputs/model.pt", marker_torch_save), "unsafe_pickle",
     f"{TOP}/data/sample_inputs/model.pt"),
    ("sample-inputs-plain-pickle", _payload_rewrite("data/sample_inputs/model.pt", marker_pickle), "unsafe_pickle",
     f"{TOP}/data/sample_inputs/model.pt"),
    ("extra-file-binary-pickle", lambda g, m: rezip(g["pt2"], add=[(f"{TOP}/extra/state.pkl", marker_pickle(m))]),
     "unexpected_part", f"{TOP}/extra/state.pkl"),
    ("second-program", lambda g, m: rezip(g["pt2"], add=[(f"{TOP}/models/evil.json", b"{}"),
                                                         (f"{TOP}/data/weights/evil.pt", marker_pickle(m))]),
     "unexpected_part", f"{TOP}/models/evil.json"),
    ("aotinductor-so", lambda g, m: rezip(g["pt2"], add=[(f"{TOP}/data/aotinductor/model/model.so", b"\x7fELF")]),
     "native_code", f"{TOP}/data/aotinductor/model/model.so"),
    ("aotinductor-cpp", lambda g, m: rezip(g["pt2"], add=[(f"{TOP}/data/aotinductor/model/model.cpp", b"int x;")]),
     "native_code", f"{TOP}/data/aotinductor/model/model.cpp"),
    ("so-elsewhere", lambda g, m: rezip(g["pt2"], add=[(f"{TOP}/data/weights/libevil.so", b"\x7fELF")]),
     "native_code", f"{TOP}/data/weights/libevil.so"),
    ("expr-str-eval", _expr, "unsafe_expression", f"{TOP}/models/model.json"),
    ("fqn-code-injection", _fqn, "unsafe_name", f"{TOP}/data/weights/model_weights_config.json"),
    ("node-target-code-injection", _node_target, "unsafe_name", f"{TOP}/models/model.json"),
    ("member-outside-folder", lambda g, m: rezip(g["pt2"], add=[("version", b"1"),
                                                                ("serialized_state_dict.pt", marker_pickle(m))]),
     "unexpected_part", "version"),
    ("traversal-dotdot", lambda g, m: rezip(g["pt2"], add=[(f"{TOP}/../../evil.pt", marker_pickle(m))]),
     "unsafe_member_name", f"{TOP}/../../evil.pt"),
    ("traversal-absolute", lambda g, m: rezip(g["pt2"], add=[("/tmp/evil.pt", marker_pickle(m))]),
     "unsafe_member_name", "/tmp/evil.pt"),
    ("traversal-backslash", lambda g, m: rezip(g["pt2"], add=[(f"{TOP}\\..\\evil.pt", marker_pickle(m))]),
     "unsafe_member_name", f"{TOP}\\..\\evil.pt"),
    ("duplicate-member", lambda g, m: rezip(g["pt2"], add=[(f"{TOP}/DATA/WEIGHTS/WEIGHT_0", marker_pickle(m))]),
     "duplicate_member", None),
    ("compression-bomb", lambda g, m: rezip(g["pt2"], replace={"data/weights/weight_0": bytes(64 << 20)},
                                            compress={"data/weights/weight_0": zipfile.ZIP_DEFLATED}),
     "compression_ratio", f"{TOP}/data/weights/weight_0"),
    ("archive-format", _payload_rewrite("archive_format", lambda m: b"zip"), None, None),  # then no known kind
    ("not-a-zip", lambda g, m: b"PK\x03\x04" + marker_pickle(m), None, None),
    ("bad-crc", lambda g, m: _bad_crc(g["pt2"]), "bad_archive", f"{TOP}/models/model.json"),
]


def _folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    return src


def _refused(call, reason: str | None, member: str | None, marker: Path, out: Path | None = None,
             src: Path | None = None) -> InvalidModel:
    with pytest.raises(ConversionError) as err:
        call()
    e = err.value
    assert isinstance(e, InvalidModel) and e.code == "invalid_model", (type(e), e.message)
    if reason:
        assert e.details.get("reason") == reason, e.details
    if member:
        named = member in e.message or repr(member)[1:-1] in e.message  # repr: backslashes doubled
        assert e.details.get("member") == member and named, (e.details, e.message)
    if src is not None:
        assert str(src) not in e.message, e.message  # no server paths
    assert not marker.exists(), "code from the upload ran"
    if out is not None:
        assert not list(out.rglob("*.onnx")), "an artifact was written"
    return e


@pytest.mark.parametrize("case_id, build, reason, member", PT2_CASES, ids=[c[0] for c in PT2_CASES])
def test_hostile_pt2_is_refused_naming_the_member(genuine, tmp_path, case_id, build, reason, member):
    marker = tmp_path / "pwned"
    src = _folder(tmp_path, {f"{TOP}.pt2": build(genuine, marker)})
    out = tmp_path / "out"
    if case_id not in ("raw-weight-is-a-pickle",):  # raw bytes are never parsed before loading
        _refused(lambda: engine.preflight(src, ["onnx:fp32"]), reason, member, marker, src=src)
    e = _refused(lambda: engine.convert(src, "onnx:fp32", out), reason, member, marker, out, src)
    assert e.details.get("file") in (f"{TOP}.pt2", None), e.details


def test_the_known_exploit_runs_in_torch_itself(genuine, tmp_path):
    """Why the vetting exists: torch 2.13's own torch.export.load runs the payload of the
    legacy-weights case (in this test's tmp dir). If this ever stops holding, the case above
    still guards the refusal."""
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / f"{TOP}.pt2"
    path.write_bytes(_legacy_declared(genuine, marker))
    with contextlib.suppress(Exception):  # the payload returns no state dict; it ran before that mattered
        torch.export.load(path)
    assert marker.exists()


def test_extra_text_files_are_never_unpickled(genuine, tmp_path):
    """torch.export.save's extra files are text torch never parses: a protocol-0 pickle there
    is just text, the program converts and the marker never appears."""
    marker = tmp_path / "pwned"
    text = marker_pickle(marker, protocol=0)
    text.decode("utf-8")  # protocol 0 is ASCII
    src = _folder(tmp_path, {f"{TOP}.pt2": rezip(genuine["pt2"], add=[(f"{TOP}/extra/notes.txt", text)])})
    result = engine.convert(src, "onnx:fp32", tmp_path / "out")
    assert result.metrics["max_abs_diff"] < 1e-4
    assert not marker.exists()
    sandbox = result.metadata["sandbox"]
    assert sandbox["rlimits"] is True and sandbox["seccomp"] in (True, "unavailable on aarch64")
    if os.geteuid() == 0:
        assert sandbox["network_namespace"] is True and sandbox["read_only_filesystem"] is True


def test_graph_calling_a_python_function_is_refused(genuine, tmp_path):
    """The deserializer resolves any torch.* name as a call target: torch.load in the graph
    would run when the program runs. Refused after loading, in the sandbox."""
    with zipfile.ZipFile(io.BytesIO(genuine["pt2"])) as zf:
        program = zf.read(f"{TOP}/models/model.json")
    assert b'"torch.ops.aten.linear.default"' in program
    evil = rezip(genuine["pt2"], replace={"models/model.json": program.replace(
        b'"torch.ops.aten.linear.default"', b'"torch.serialization.load"', 1)})
    src = _folder(tmp_path, {f"{TOP}.pt2": evil})
    with pytest.raises(InvalidModel) as err:
        engine.convert(src, "onnx:fp32", tmp_path / "out")
    assert err.value.details.get("reason") in ("unexpected_call", "loader_failed"), err.value.details


# ------------------------------------------------------------------------------- TorchScript


def _ts_folder(tmp_path: Path, data: bytes) -> Path:
    inputs = json.dumps([{"name": "x", "shape": ["batch", 8], "dtype": "float32"}]).encode()
    return _folder(tmp_path, {"model.pt": data, "inputs.json": inputs})


def _ts_code_with(data: bytes, line: bytes) -> bytes:
    """`line` added before the first return of the module's forward (in its code/ file)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        top = zf.namelist()[0].split("/", 1)[0]
        name, code = next((n, zf.read(n)) for n in zf.namelist()
                          if n.startswith(f"{top}/code/") and n.endswith(".py") and b"def forward" in zf.read(n))
    patched = code.replace(b"    return", b"    " + line + b"\n    return", 1)
    return rezip(data, replace={name[len(top) + 1:]: patched})


TS_CASES = [
    ("ts-pickled-constants", lambda g, m: rezip(g["ts"], replace={"constants.pkl": marker_pickle(m)}), None, None),
    ("ts-pickled-data", lambda g, m: rezip(g["ts"], replace={"data.pkl": marker_pickle(m)}), None, None),
    ("ts-so-member", lambda g, m: rezip(g["ts"], add=[("model/libevil.so", b"\x7fELF")]), "native_code",
     "model/libevil.so"),
    ("ts-from-file", lambda g, m: _ts_code_with(g["ts"], b'_0 = torch.from_file("/etc/passwd", True, 4)'),
     "file_access", None),
    ("ts-traversal", lambda g, m: rezip(g["ts"], add=[("model/../evil.pkl", marker_pickle(m))]),
     "unsafe_member_name", "model/../evil.pkl"),
]


@pytest.mark.parametrize("case_id, build, reason, member", TS_CASES, ids=[c[0] for c in TS_CASES])
def test_hostile_torchscript_is_refused(genuine, tmp_path, case_id, build, reason, member):
    marker = tmp_path / "pwned"
    src = _ts_folder(tmp_path, build(genuine, marker))
    out = tmp_path / "out"
    e = _refused(lambda: engine.convert(src, "onnx:fp32", out), reason, member, marker, out, src)
    if reason is None:  # torch.jit.load's C++ unpickler refused the global, inside the sandbox
        assert e.details.get("reason") in ("loader_failed", "loader_crashed"), e.details


# ------------------------------------------------------------------------------- .bin checkpoints


def _bert_folder(tmp_path: Path, weights: bytes) -> Path:
    config = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 32, "hidden_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 64, "type_vocab_size": 2}
    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(27)]])
    return _folder(tmp_path, {"config.json": json.dumps(config).encode(), "vocab.txt": vocab.encode(),
                              "pytorch_model.bin": weights})


@pytest.mark.parametrize("writer", ["torch.save-zip", "legacy-pickle"])
def test_malicious_bin_checkpoint_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    weights = marker_torch_save(marker) if writer == "torch.save-zip" else marker_pickle(marker)
    src = _bert_folder(tmp_path, weights)
    e = _refused(lambda: engine.convert(src, "onnx:fp32", tmp_path / "out"), "unsafe_pickle", None, marker,
                 tmp_path / "out", src)
    assert "pytorch_model.bin" in e.message and e.details["file"] == "pytorch_model.bin"


def test_plain_bin_checkpoint_still_loads_through_mmap(tmp_path):
    """The safe path stays usable: a tensors-only zip .bin loads weights_only with mmap."""
    import torch

    from quantyard.engine.onnx.source import load_pickled_state_dict

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(6.0)}, path)
    state = load_pickled_state_dict(path)
    assert torch.equal(state["w"], torch.arange(6.0))
