"""Hostile uploads, job bodies and query parameters against a real `quantyard serve` (issue 10).

Every case goes through the HTTP API of the embedded default stack, as a hostile tenant would.
Each must end in a clear refusal: a 4xx with our JSON error at upload, or the job `failed` with
a typed code on the job and on every target. For every case, from outside the processes:

- the error names the file or field, and holds no server path, store URI or library text;
- no marker file appears (pickles in every place an archive can hold one try to write it);
- the worker survives (same PID) and its process tree's RSS stays under WORKER_RSS_BOUND, the
  API's under API_RSS_BOUND and within API_RSS_GROWTH_BOUND of where it was (sampled at 20 Hz);
- scratch and upload folders are empty afterwards;
- a refused upload stores nothing (no new object, no source row);
- GET /v1/artifacts and GET /v1/jobs still answer 200 (and the job list stays small).

The module ends with a good tiny model converting on the same worker.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import httpx
import pytest

from tests.api import archives
from tests.e2e.conftest import wait_for_job
from tests.fixtures.models import arch_model, cached_model, make_tiny_llama, make_tiny_llama_bytelevel
from tests.security import hostile as h
from tests.security.conftest import API_RSS_BOUND, API_RSS_GROWTH_BOUND, WORKER_RSS_BOUND

pytestmark = pytest.mark.e2e

JOB_TIMEOUT_S = 120
# Words that mean a library's text or a crash reached the tenant instead of our own message.
LIBRARY_TEXT = ("Traceback", "site-packages", "RecursionError", "ZeroDivisionError", "SafetensorError",
                "UnicodeDecodeError", "KeyError", "struct.error", "OverflowError", "MemoryError", "BadZipFile",
                "JSONDecodeError", "internal server error", "object has no attribute")
ARCHIVE_CODES = ("unsafe_archive", "invalid_archive")
CORRUPT_CODES = (*ARCHIVE_CODES, "invalid_model")  # a corrupt member: the archive's fault or the model's
BOMB_CODES = ("unsafe_archive", "resource_limit", "payload_too_large")
MODEL_CODES = ("invalid_model",)
SIZE_CODES = ("invalid_model", "resource_limit")


class Materials:
    """Real tiny model folders (cached builds) as {file name: bytes}, made on first use."""

    @cached_property
    def llama(self) -> dict[str, bytes]:
        return h.folder_files(cached_model("tiny-llama", make_tiny_llama))

    @cached_property
    def bytelevel(self) -> dict[str, bytes]:
        return h.folder_files(cached_model("tiny-llama-bytelevel", make_tiny_llama_bytelevel))

    @cached_property
    def gpt2(self) -> dict[str, bytes]:
        return h.folder_files(arch_model("gpt2"))

    def llama_with(self, **files: bytes) -> dict[str, bytes]:
        return {**self.llama, **files}


@dataclass(frozen=True)
class Upload:
    body: bytes
    content_type: str = "application/gzip"


def hf(files: dict[str, bytes]) -> Upload:
    return Upload(h.tar_of(files))


def program(files: dict[str, bytes]) -> Upload:
    return Upload(h.tar_of(files, prefix="prog/"))


def raw(data: bytes, content_type: str = "application/octet-stream") -> Upload:
    return Upload(data, content_type)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Materials, Path], Upload]  # (materials, marker path) -> what is uploaded
    codes: tuple[str, ...]
    names: tuple[str, ...]  # the message names one of these (file, member or field)
    stage: str = "upload"  # "upload": refused at upload; "either": at upload, or the job fails
    targets: tuple[str, ...] = ("gguf:F32",)


def _archive(case_id: str, make: Callable[[], bytes], *names: str, codes=ARCHIVE_CODES, ctype="application/gzip"):
    return Case(case_id, lambda m, marker: Upload(make(), ctype), codes, names)


ZIP = "application/zip"
TAR = "application/x-tar"

ARCHIVE_CASES = [
    _archive("tar.gz-parent-traversal", archives.traversal_tar_gz, "../evil.txt"),
    _archive("tar-parent-traversal", h.plain_tar_traversal, "../../quantyard-evil", ctype=TAR),
    _archive("tar.gz-absolute-path", h.tar_absolute, "/etc/cron.d/quantyard-evil"),
    _archive("tar.gz-symlink-out", archives.symlink_tar_gz, "weights.bin"),
    _archive("tar.gz-symlink-then-write-through", h.tar_symlink_then_write, "escape"),
    _archive("tar.gz-hardlink-out", h.tar_hardlink_out, "passwd"),
    _archive("tar.gz-char-device", archives.device_tar_gz, "null"),
    _archive("tar.gz-block-device", h.tar_block_device, "sda"),
    _archive("tar.gz-fifo", archives.fifo_tar_gz, "pipe"),
    _archive("tar.gz-duplicate-member", lambda: archives.model_tar_gz(
        extra=[archives.file_member("config.json", b"{}")]), "config.json"),
    _archive("tar.gz-truncated", lambda: archives.model_tar_gz()[:100], "archive"),
    _archive("zip-parent-traversal", lambda: h.zip_member("../../quantyard-evil"), "quantyard-evil", ctype=ZIP),
    _archive("zip-backslash-traversal", lambda: h.zip_member("..\\..\\quantyard-evil"), "quantyard-evil", ctype=ZIP),
    _archive("zip-absolute-path", archives.absolute_zip, "/etc/cron.d/evil", ctype=ZIP),
    _archive("zip-drive-letter", lambda: h.zip_member("C:/Windows/quantyard-evil"), "C:", ctype=ZIP),
    _archive("zip-symlink", archives.symlink_zip, "link", ctype=ZIP),
    _archive("zip-bomb-2GiB", h.zip_bomb, "model.safetensors", "ratio", codes=BOMB_CODES, ctype=ZIP),
    _archive("tar.gz-bomb-2GiB", h.tar_gz_bomb, "model.safetensors", "ratio", codes=BOMB_CODES),
    _archive("zip-million-members", h.zip_million_members, "member", codes=BOMB_CODES, ctype=ZIP),
    # found by fuzz/fuzz_archive.py
    _archive("zip-config.json-bad-crc", h.zip_bad_crc, "config.json", ctype=ZIP, codes=CORRUPT_CODES),
    _archive("zip-member-name-not-utf8", h.zip_name_not_utf8, "name", "utf-8", ctype=ZIP, codes=CORRUPT_CODES),
    _archive("zip-strong-encryption-flag", h.zip_strong_encryption_flag, "config.json", ctype=ZIP,
             codes=CORRUPT_CODES),
]


def _gguf(case_id: str, make: Callable[[], bytes], *names: str, stage: str = "upload") -> Case:
    return Case(case_id, lambda m, marker: raw(make()), MODEL_CODES, names or ("GGUF",), stage,
                targets=("gguf:Q8_0",))


GGUF_CASES = [
    _gguf("gguf-kv-count-2^63", lambda: h.gguf_file(h.gguf_base_kv(), n_kv=h.NEAR_2_63)),
    _gguf("gguf-key-length-2^63", lambda: h.gguf_file(
        [h.struct.pack("<Q", h.NEAR_2_63) + b"general.architecture"])),
    _gguf("gguf-string-value-2^63", lambda: h.gguf_file(
        [h.gguf_string("general.name") + h.struct.pack("<IQ", 8, h.NEAR_2_63) + b"x" * 32])),
    _gguf("gguf-u8-array-count-2^63", lambda: h.gguf_array_count(h.NEAR_2_63)),
    _gguf("gguf-string-array-count-2^62", lambda: h.gguf_array_count(2**62, item_type=8)),
    _gguf("gguf-60M-item-array", h.gguf_huge_array, "GGUF", "tensor", stage="either"),
    _gguf("gguf-tensor-count-2^63", lambda: h.gguf_file(h.gguf_base_kv(), n_tensors=h.NEAR_2_63),
          "GGUF", "tensor", stage="either"),
    _gguf("gguf-tensor-dims-2^62", lambda: h.gguf_file(h.gguf_base_kv(), tensors=[
        h.gguf_tensor_info("token_embd.weight", [2**62, 2**62])], tail=bytes(64)),
        "token_embd.weight", stage="either"),
    _gguf("gguf-tensor-ndims-2^31", lambda: h.gguf_file(h.gguf_base_kv(), tensors=[
        h.gguf_string("token_embd.weight") + h.struct.pack("<I", 2**31) + bytes(64)]),
        "token_embd.weight", "GGUF", stage="either"),
    _gguf("gguf-alignment-zero", lambda: h.gguf_file(h.gguf_base_kv() + [h.gguf_kv_u32("general.alignment", 0)],
                                                     tensors=[h.gguf_tensor_info("token_embd.weight", [8, 4])],
                                                     tail=bytes(256)),
          "alignment", stage="either"),
]

_EMBED = "model.embed_tokens.weight"


def _weights(case_id: str, make: Callable[[], bytes]) -> Case:
    return Case(case_id, lambda m, marker: hf(m.llama_with(**{"model.safetensors": make()})), MODEL_CODES,
                ("model.safetensors",), "either")


SAFETENSORS_CASES = [
    _weights("safetensors-header-length-2^63", lambda: h.safetensors_raw(b"{}", length=h.NEAR_2_63)),
    _weights("safetensors-offsets-2^63", lambda: h.safetensors_one(_EMBED, "F32", [2**61], [0, 2**63])),
    _weights("safetensors-offsets-past-eof", lambda: h.safetensors_one(_EMBED, "F32", [1024], [0, 4096],
                                                                       data=bytes(16))),
    _weights("safetensors-shape-product-2^82", lambda: h.safetensors_one(_EMBED, "F32", [2**40, 2**40],
                                                                         [0, 2**82])),
    _weights("safetensors-header-100k-deep", lambda: h.safetensors_raw(h.deep_json())),
    _weights("safetensors-header-not-utf8", lambda: h.safetensors_raw(b'{"\xff\xfe": 1}')),
    _weights("safetensors-overlapping-tensors", lambda: h.safetensors_raw(json.dumps({
        _EMBED: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "lm_head.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode(), data=bytes(24))),
]


def _config_bytes(case_id: str, make: Callable[[], bytes], stage: str = "upload") -> Case:
    return Case(case_id, lambda m, marker: hf(m.llama_with(**{"config.json": make()})), MODEL_CODES,
                ("config.json",), stage)


def _config_field(case_id: str, **changes) -> Case:
    names = (*changes, "config.json")
    return Case(case_id, lambda m, marker: hf(h.with_config(m.llama, **changes)), SIZE_CODES, names, "either")


CONFIG_CASES = [
    _config_bytes("config-100k-deep", h.deep_json),
    _config_bytes("config-not-an-object", lambda: b"[1, 2, 3]"),
    _config_bytes("config-not-utf8", lambda: b'\xff\xfe{"model_type": "llama"}'),
    _config_bytes("config-17MB", lambda: b'{"model_type": "llama", "pad": "' + b"x" * (17 << 20) + b'"}'),
    _config_bytes("config-5000-digit-number", lambda: b'{"model_type": "llama", "hidden_size": '
                  + b"9" * 5000 + b"}"),
    _config_field("config-num_hidden_layers-1e6", num_hidden_layers=1_000_000),
    _config_field("config-vocab_size-1e12", vocab_size=10**12),
    _config_field("config-hidden_size-1e9", hidden_size=10**9),
    _config_field("config-num_attention_heads-0", num_attention_heads=0),
    _config_field("config-intermediate_size-negative", intermediate_size=-1),
]

PROGRAM_TARGETS = ("onnx:fp32",)


def _program(case_id: str, make: Callable[[Path], dict[str, bytes]], names=("model.pt2",), stage="either") -> Case:
    return Case(case_id, lambda m, marker: program(make(marker)), MODEL_CODES, names, stage, PROGRAM_TARGETS)


def _bin_without_safetensors(m: Materials, marker: Path) -> dict[str, bytes]:
    files = {k: v for k, v in m.llama.items() if k != "model.safetensors"}
    return {**files, "pytorch_model.bin": h.marker_torch_save(marker)}


PICKLE_CASES = [
    Case("hf-pytorch_model.bin-pickle-gguf", lambda m, marker: hf(_bin_without_safetensors(m, marker)),
         MODEL_CODES, ("pytorch_model.bin", "safetensors"), "either", ("gguf:F32",)),
    Case("hf-pytorch_model.bin-pickle-onnx", lambda m, marker: hf(_bin_without_safetensors(m, marker)),
         MODEL_CODES, ("pytorch_model.bin",), "either", ("onnx:fp32",)),
    _program("pt2-legacy-data-weights-model.pt", lambda marker: {"model.pt2": h.pt2_legacy_weights(marker)}),
    _program("pt2-pickled-weight", lambda marker: {"model.pt2": h.pt2_pickled_part(marker, "data/weights")}),
    _program("pt2-pickled-constant", lambda marker: {"model.pt2": h.pt2_pickled_part(marker, "data/constants")}),
    _program("pt2-pickled-sample-inputs",
             lambda marker: {"model.pt2": h.pt2_pickled_part(marker, "data/sample_inputs")}),
    _program("pt2-aotinductor-shared-library", lambda marker: {"model.pt2": h.pt2_with_native_code()}),
    _program("torchscript-data.pkl-pickle", lambda marker: {"model.pt": h.torchscript_pickle(marker, "data.pkl")},
             names=("model.pt",)),
    _program("torchscript-constants.pkl-pickle",
             lambda marker: {"model.pt": h.torchscript_pickle(marker, "constants.pkl")}, names=("model.pt",)),
    # found by fuzz/fuzz_program_vetting.py
    _program("pt2-member-name-not-utf8", lambda marker: {"model.pt2": h.pt2_name_not_utf8()}),
    _program("pt2-bad-crc", lambda marker: {"model.pt2": h.pt2_bad_crc()}),
    _program("plain-pickle-renamed-.pt", lambda marker: {"model.pt": h.marker_pickle(marker)},
             names=("model.pt",), stage="upload"),
    _program("plain-pickle-renamed-.pt2", lambda marker: {"model.pt2": h.marker_pickle(marker)}, stage="upload"),
    _program("torch.save-module-renamed-.pt", lambda marker: {"model.pt": h.marker_torch_save(marker)},
             names=("model.pt",), stage="upload"),
]

ONNX_CASES = [
    _program("onnx-external-data-parent-path", lambda marker: h.onnx_external("../../etc/passwd"),
             names=("../../etc/passwd",)),
    _program("onnx-external-data-absolute-path", lambda marker: h.onnx_external("/etc/passwd"),
             names=("/etc/passwd",)),
    _program("onnx-external-data-length-2^62", lambda marker: h.onnx_external("w.bin", length=2**62),
             names=("w.bin",)),
]


def _tokenizer(case_id: str, make: Callable[[], bytes]) -> Case:
    return Case(case_id, lambda m, marker: hf({**m.bytelevel, "tokenizer.json": make()}), MODEL_CODES,
                ("tokenizer.json",), "either")


MODEL_CASES = [
    _tokenizer("tokenizer.json-malformed", lambda: b'{"model": {"type": "BPE", "vocab": {"a": 0,'),
    _tokenizer("tokenizer.json-100k-deep", h.deep_json),
    _tokenizer("tokenizer.json-250k-tokens", lambda: h.huge_tokenizer_json(250_000)),
    Case("nan-weight", lambda m, marker: hf(h.nan_model(m.llama)), ("validation_failed", "invalid_model"),
         ("nan", "model.norm.weight"), "either"),
    Case("llama-config-over-gpt2-tensors", lambda m, marker: hf(h.llama_config_over_gpt2(m.gpt2)),
         ("invalid_model", "validation_failed"), ("tensor", "model.safetensors"), "either", ("onnx:fp32",)),
]

UPLOAD_CASES = ARCHIVE_CASES + GGUF_CASES + SAFETENSORS_CASES + CONFIG_CASES + PICKLE_CASES + ONNX_CASES + MODEL_CASES


# ------------------------------------------------------------------------------------------ potency


def test_the_marker_pickles_are_real_exploits(tmp_path):
    """The oracle for "no marker appears": loading these inputs the way torch does on its own
    writes the marker (torch.export.load falls back to weights_only=False for the legacy weights
    file and for sample inputs; torch.load(weights_only=False) is what a naive .bin reader does)."""
    import logging

    import torch

    logging.getLogger("torch._export.serde.serialize").setLevel(logging.CRITICAL)
    for name, build in (("legacy", h.pt2_legacy_weights),
                        ("sample_inputs", lambda m: h.pt2_pickled_part(m, "data/sample_inputs"))):
        marker = tmp_path / f"pwned-{name}"
        path = tmp_path / f"{name}.pt2"
        path.write_bytes(build(marker))
        try:
            torch.export.load(path)
        except Exception:  # the payload runs while loading; what the load makes of it after is moot
            pass
        assert marker.exists(), f"the {name} .pt2 did not run its payload: the case would prove nothing"
    marker = tmp_path / "pwned-bin"
    torch.load(io.BytesIO(h.marker_torch_save(marker)), weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------ checks


@pytest.fixture(scope="module")
def materials() -> Materials:
    return Materials()


@pytest.fixture
def client(hostile_stack):
    with httpx.Client(base_url=hostile_stack.stack.url, timeout=300,
                      headers={"Authorization": f"Bearer {hostile_stack.stack.api_key}"}) as c:
        yield c


def assert_clean(text: str, stack, what: str) -> None:
    """No server path, store URI or library text in what a tenant sees."""
    for bad in (str(stack.home), str(stack.data_dir), "file://", "/scratch/", *LIBRARY_TEXT):
        assert bad not in text, f"{what} exposes {bad!r}: {text[:600]}"


def assert_names(message: str, names: tuple[str, ...], what: str) -> None:
    assert any(n.lower() in message.lower() for n in names), f"{what} names none of {names}: {message[:600]}"


def check_refusal(response: httpx.Response, codes, names, stack) -> None:
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:600]}"
    body = response.json()
    error = body.get("error") or {}
    assert error.get("code") in codes, f"code {error.get('code')!r}, expected one of {codes}: {response.text[:600]}"
    assert_names(error.get("message", ""), names, "the refusal")
    assert_clean(json.dumps(body), stack, "the refusal")


def check_failed_job(job: dict, codes, names, stack) -> None:
    assert job["status"] == "failed", f"job ended {job['status']}: {json.dumps(job)[:800]}"
    assert job["error"] and job["error"]["code"] in codes, f"job error {job['error']}, expected {codes}"
    assert_names(job["error"]["message"], names, "the job's error")
    for target in job["targets"]:
        assert target["status"] == "failed", f"target {target['key']} left {target['status']}"
        assert target["error"] and target["error"]["code"] in codes, f"target {target['key']}: {target['error']}"
    assert not job["artifact_ids"], "a failed job published artifacts"
    assert_clean(json.dumps(job), stack, "the job")


def run_job(client, stack, source_id: str, targets) -> dict:
    made = client.post("/v1/jobs", json={"source": source_id, "targets": list(targets)})
    assert made.status_code == 202, made.text[:600]
    job_id = made.json()["id"]
    try:
        job, _ = wait_for_job(client, job_id, timeout_s=JOB_TIMEOUT_S)
    except AssertionError:
        client.post(f"/v1/jobs/{job_id}/cancel")  # free the worker for the next case
        raise
    return job


def check_health(client, stack, peak, marker: Path) -> None:
    """What must hold after every case, whatever the case's outcome."""
    assert not peak.killed, peak.killed
    assert not marker.exists(), "code from the upload ran: the marker file exists"
    worker = stack.worker()
    assert worker is not None and worker.pid == stack.worker_pid, "the worker process did not survive"
    assert peak.worker < WORKER_RSS_BOUND, f"worker tree peaked at {peak.worker >> 20} MiB"
    assert peak.api < API_RSS_BOUND, f"API peaked at {peak.api >> 20} MiB"
    growth = peak.api - peak.api_before
    assert growth < API_RSS_GROWTH_BOUND, f"API grew by {growth >> 20} MiB during the case"
    assert stack.leftovers() == [], f"scratch/upload space left behind: {stack.leftovers(0)}"
    for path in ("/v1/artifacts", "/v1/jobs?limit=50"):
        r = client.get(path)
        assert r.status_code == 200, f"GET {path} -> {r.status_code}: {r.text[:300]}"
        assert len(r.content) < 2 << 20, f"GET {path} returned {len(r.content)} bytes"


def _record(stack, case_id: str, outcome: str, peak, started: float) -> None:
    stack.measurements.append({"case": case_id, "outcome": outcome, "worker_mib": peak.worker >> 20,
                               "api_mib": peak.api >> 20, "api_growth_mib": (peak.api - peak.api_before) >> 20,
                               "seconds": round(time.monotonic() - started, 1)})


# ------------------------------------------------------------------------------------------ uploads


@pytest.mark.parametrize("case", UPLOAD_CASES, ids=[c.id for c in UPLOAD_CASES])
def test_hostile_upload(case: Case, hostile_stack, client, materials, tmp_path):
    marker = tmp_path / "pwned"
    upload = case.build(materials, marker)
    objects, sources = hostile_stack.objects(), hostile_stack.source_rows()
    started, outcome, watch = time.monotonic(), "?", hostile_stack.watch()
    peak = watch.peak
    try:
        with watch:
            response = client.post("/v1/sources", params={"name": case.id}, content=upload.body,
                                   headers={"Content-Type": upload.content_type})
            if response.status_code == 201:
                assert case.stage == "either", f"accepted at upload: {response.text[:600]}"
                job = run_job(client, hostile_stack, response.json()["id"], case.targets)
                outcome = f"job {job['status']} ({(job['error'] or {}).get('code')})"
                check_failed_job(job, case.codes, case.names, hostile_stack)
            else:
                outcome = f"{response.status_code} {response.json().get('error', {}).get('code')}"
                check_refusal(response, case.codes, case.names, hostile_stack)
                # new objects only: one that went (an anchor's temporary write finishing) is no leftover
                left = hostile_stack.objects() - objects
                assert not left, f"a refused upload left objects in the store: {sorted(left)}"
                assert hostile_stack.source_rows() == sources, "a refused upload left a source row"
    finally:
        _record(hostile_stack, case.id, outcome, peak, started)
    check_health(client, hostile_stack, peak, marker)


# ------------------------------------------------------------------------------------------ job bodies


@pytest.fixture(scope="module")
def good_source(_hostile_stack, materials) -> str:
    stack = _hostile_stack["stack"]
    with stack.stack.client() as c:
        r = c.post("/v1/sources", params={"name": "tiny-llama"}, content=h.tar_of(materials.llama),
                   headers={"Content-Type": "application/gzip"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def gguf_source(_hostile_stack) -> str:
    stack = _hostile_stack["stack"]
    with stack.stack.client() as c:
        r = c.post("/v1/sources", params={"name": "header-only.gguf"}, content=h.gguf_file(h.gguf_base_kv()),
                   headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _labels_39mb(source: str) -> bytes:
    labels = {f"k{i}": "v" * 480 for i in range(80_000)}
    return json.dumps({"source": source, "targets": ["gguf:F32"], "labels": labels}).encode()


def _calibration_200mb(source: str) -> bytes:
    head = json.dumps({"source": source, "targets": [{"format": "gguf", "quantization": "Q4_K_M",
                                                      "params": {"calibration_text": "@@"}}]}).encode()
    return head.replace(b"@@", b"x" * (200 << 20))


def _deep_params(source: str) -> bytes:
    head = json.dumps({"source": source, "targets": [{"format": "gguf", "quantization": "F32",
                                                      "params": {"x": "@@"}}]}).encode()
    return head.replace(b'"@@"', b"[" * 100_000 + b"]" * 100_000)


def _million_targets(source: str) -> bytes:
    return json.dumps({"source": source, "targets": ["gguf:F32"] * 1_000_000}).encode()


BODY_CASES = {
    "labels-39MB": (_labels_39mb, ("labels", "body", "bytes")),
    "calibration_text-200MB": (_calibration_200mb, ("calibration_text", "body", "bytes")),
    "params-100k-deep": (_deep_params, ("params", "body", "deep", "nest")),
    "targets-1M-entries": (_million_targets, ("targets", "body", "bytes")),
}
BODY_CODES = ("payload_too_large", "validation_error", "bad_request", "invalid_json")


@pytest.mark.parametrize("name", list(BODY_CASES))
def test_hostile_job_body(name, hostile_stack, client, good_source, tmp_path):
    make, names = BODY_CASES[name]
    body = make(good_source)
    started, outcome, watch = time.monotonic(), "?", hostile_stack.watch()
    peak = watch.peak
    try:
        with watch:
            r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
            outcome = str(r.status_code)
            if r.status_code == 202:
                client.post(f"/v1/jobs/{r.json()['id']}/cancel")
            assert r.status_code in (400, 413, 422), f"{r.status_code}: {r.text[:400]}"
            check_refusal(r, BODY_CODES, names, hostile_stack)
    finally:
        _record(hostile_stack, name, outcome, peak, started)
    check_health(client, hostile_stack, peak, tmp_path / "pwned")


def test_gguf_source_with_an_onnx_target_is_refused(hostile_stack, client, gguf_source, tmp_path):
    """Issue 10: `KeyError: 'fp32'` from the worker; the catalog knows enough to say 422."""
    with hostile_stack.watch() as peak:
        r = client.post("/v1/jobs", json={"source": gguf_source, "targets": ["onnx:fp32"]})
        if r.status_code == 202:
            job, _ = wait_for_job(client, r.json()["id"], timeout_s=JOB_TIMEOUT_S)
            check_failed_job(job, ("unsupported_target",), ("onnx", "gguf"), hostile_stack)
        else:
            check_refusal(r, ("unsupported_target",), ("onnx", "gguf"), hostile_stack)
            assert r.status_code == 422
    check_health(client, hostile_stack, peak, tmp_path / "pwned")


# ------------------------------------------------------------------------------------------ queries

QUERY_CASES = [
    ("/v1/artifacts", {"max_size": str(2**64)}, (422,), "max_size"),
    ("/v1/artifacts", {"min_size": str(2**63)}, (200, 422), "min_size"),
    ("/v1/artifacts", {"created_after": "0001-01-01T00:00:00+14:00"}, (422,), "created_after"),
    ("/v1/artifacts", {"created_before": "9999-12-31T23:59:59-14:00"}, (200, 422), "created_before"),
    ("/v1/artifacts", {"created_after": "not-a-date"}, (422,), "created_after"),
    ("/v1/artifacts", {"cursor": "!!not-a-cursor!!"}, (400, 422), "cursor"),
    ("/v1/artifacts", {"max_mean_kl": "nan"}, (200, 422), "max_mean_kl"),
    ("/v1/jobs", {"limit": str(2**64)}, (422,), "limit"),
    ("/v1/jobs", {"cursor": "A" * 5000}, (400, 422), "cursor"),
]


@pytest.mark.parametrize("path,params,statuses,field", QUERY_CASES,
                         ids=[f"{p}?{next(iter(q))}={next(iter(q.values()))[:24]}" for p, q, _, _ in QUERY_CASES])
def test_hostile_query(path, params, statuses, field, hostile_stack, client, tmp_path):
    with hostile_stack.watch() as peak:
        r = client.get(path, params=params)
    assert r.status_code in statuses, f"{r.status_code}: {r.text[:400]}"
    if r.status_code != 200:
        codes = ("validation_error", "invalid_argument", "invalid_cursor", "bad_request")
        check_refusal(r, codes, (field,), hostile_stack)
    check_health(client, hostile_stack, peak, tmp_path / "pwned")


# ------------------------------------------------------------------------------------------ afterwards


def test_a_good_model_still_converts_on_the_same_worker(hostile_stack, client, good_source, tmp_path):
    """Last in the module: after every hostile case, the same worker process converts a good model."""
    with hostile_stack.watch() as peak:
        job = run_job(client, hostile_stack, good_source, ["gguf:F32"])
    assert job["status"] == "succeeded", json.dumps(job)[:800]
    assert len(job["artifact_ids"]) == 1
    artifact = client.get(f"/v1/artifacts/{job['artifact_ids'][0]}")
    assert artifact.status_code == 200 and artifact.json()["format"] == "gguf"
    check_health(client, hostile_stack, peak, tmp_path / "pwned")
