"""One plan, two executors (issue 11): `quantyard convert`'s convert_many and a service job (the
real prepare and target tasks in-process, SQLite catalog, local object store) make byte-identical
files for the same source and targets, and a job with several GGUF targets reads the source's
tensors once and computes the source's reference outputs once, across all of its tasks.

Counted where the work happens: converter.read_f32 (every tensor the GGUF writer reads from the
safetensors) and reference.compute_reference (the transformers run on the source), with the
in-process reference cache emptied first so that a target task which recomputed would show."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from quantyard import catalog
from quantyard.engine.gguf import converter, reference, validate
from quantyard.engine.hf.safetensors_header import read_safetensors_header
from quantyard.engine.stages import convert_many
from tests.worker.test_pipeline import _get, _job, _run, runtime, source_id  # noqa: F401

QUANTS = ["F16", "Q8_0", "Q4_K_M", "IQ2_XS"]  # float, two quantized, one with an importance matrix


@pytest.fixture
def counts(monkeypatch) -> dict[str, int]:
    counted = {"tensor_reads": 0, "references": 0}
    real_read, real_reference = converter.read_f32, reference.compute_reference

    def read(ref):
        counted["tensor_reads"] += 1
        return real_read(ref)

    def compute(*args, **kwargs):
        counted["references"] += 1
        return real_reference(*args, **kwargs)

    monkeypatch.setattr(converter, "read_f32", read)
    monkeypatch.setattr(reference, "compute_reference", compute)
    monkeypatch.setattr(validate, "compute_reference", compute)  # validate's own binding
    validate._REFERENCE_CACHE.clear()
    converter._VOCAB.clear()
    return counted


def _n_tensors(model_dir: Path) -> int:
    return sum(len(read_safetensors_header(f)[0]) for f in sorted(model_dir.glob("*.safetensors")))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_and_service_make_the_same_bytes_reading_the_source_once(runtime, source_id, counts,  # noqa: F811
                                                                      tiny_llama_dir, tmp_path):
    job_id = _job(runtime, source_id, QUANTS)
    downloads: list[str] = []
    real_download = runtime.store.download_file

    def download(key, dest, *args, **kwargs):
        downloads.append(key)
        return real_download(key, dest, *args, **kwargs)

    runtime.store.download_file = download
    outcome, targets = _run(runtime, job_id)
    assert (outcome, targets) == ("dispatched", ["succeeded"] * 3)  # F16: in the prepare task's pass
    job = _get(runtime, job_id)
    assert job["status"] == "succeeded"
    n = _n_tensors(tiny_llama_dir)
    assert counts == {"tensor_reads": n, "references": 1}, counts  # one pass, one reference, 4 targets

    with runtime.session() as s:
        service = [catalog.get_artifact(s, artifact_id=i).to_dict() for i in job["artifact_ids"]]
        source = catalog.get_source(s, source_id=source_id)
        sha256, name, source_key = source.sha256, source.name, source.storage_key
    # the source archive is downloaded by the prepare task only: target tasks get the source's
    # files but its weights, stored beside the intermediate with the reference outputs
    assert downloads.count(source_key) == 1, downloads
    assert [a["quantization"] for a in service] == QUANTS

    # The same source: the folder the service unpacked is named as in its archive, and llama.cpp
    # derives general.basename / general.version from a model folder's name.
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "tiny-llama")
    counts.update(tensor_reads=0, references=0)
    validate._REFERENCE_CACHE.clear()
    local = convert_many(folder, [f"gguf:{q}" for q in QUANTS], tmp_path / "cli",
                         provenance={"name": name}, source_sha256=sha256)
    assert counts == {"tensor_reads": n, "references": 1}, counts
    for art, result in zip(service, local, strict=True):
        stored = tmp_path / "service" / art["filename"]
        runtime.store.download_file(art["storage_key"], stored)
        assert _sha(stored) == art["sha256"] == _sha(result.path), art["quantization"]
        assert result.metrics["mean_kl"] == art["metrics"]["mean_kl"]  # same reference, same check
