"""Memory and disk bombs: archives that unpack to far more than they weigh, archives with a
million members, configs whose sizes would make a conversion allocate without bound, and a
conversion that outgrows its memory or scratch limit.

Every case asserts the error code, that the message names the member / file and field and
holds no server path, and that the refusal cost little (tracemalloc peak, or the child
process's peak RSS under an address-space limit so a regression cannot take the machine down).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from api.uploads import check_source_archive
from quantyard import archive
from quantyard.archive import InvalidArchive, UnsafeArchive
from quantyard.settings import Settings
from tests.api import archives
from tests.security import hostile as h

MB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
CAPS = {"max_members": 10_000, "max_unpacked_bytes": 64 << 30}  # the service defaults


def _write(tmp_path: Path, data: bytes, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _refusal(fn) -> tuple[BaseException | None, int, float]:
    """(what fn raised, peak bytes Python allocated meanwhile, seconds)."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        try:
            fn()
            exc = None
        except Exception as e:  # noqa: BLE001 - asserted by the caller
            exc = e
        return exc, tracemalloc.get_traced_memory()[1], time.monotonic() - start
    finally:
        tracemalloc.stop()


def _no_path(message: str, tmp_path: Path) -> None:
    assert str(tmp_path) not in message and "/tmp" not in message, message


def _unpacked_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


# ------------------------------------------------------------------------------------ archives


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """Built once: each takes a second or two to make."""
    d = tmp_path_factory.mktemp("bombs")
    return {"zip": _write(d, h.zip_bomb(), "bomb.zip"), "tar.gz": _write(d, h.tar_gz_bomb(), "bomb.tar.gz")}


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_2gib_bomb_is_refused_from_its_headers(kind, bombs, tmp_path):
    """Issue 10: a 2.2 MB zip of zeros unpacked 2 GiB. Refused before decompressing it."""
    path = bombs[kind]
    assert path.stat().st_size < 3 * MB
    exc, peak, seconds = _refusal(lambda: archive.inspect_archive(path, **CAPS))
    assert isinstance(exc, UnsafeArchive) and exc.member == "model.safetensors", exc
    assert "compression bomb" in str(exc) and "model.safetensors" in str(exc)
    _no_path(str(exc), tmp_path)
    assert peak < 4 * MB, f"inspection allocated {peak >> 20} MiB"
    dest = tmp_path / "out"
    exc, peak, _ = _refusal(lambda: archive.extract_archive(path, dest, **CAPS))
    assert isinstance(exc, UnsafeArchive) and exc.member == "model.safetensors"
    assert _unpacked_bytes(dest) < MB  # nothing of the bomb was written
    print(f"[bombs] {kind} bomb ({path.stat().st_size >> 10} KiB -> 2 GiB) refused in {seconds:.3f} s, "
          f"peak {peak >> 10} KiB")


def test_tar_gz_bomb_is_refused_at_the_member_header(tmp_path):
    """The refusal comes from the header, before tarfile reads the member: the same bomb cut
    right after its first compressed chunk is refused as a bomb, not found truncated."""
    data = h.tar_gz_bomb(unpacked=2 << 30, chunk=64 << 20)
    cut = _write(tmp_path, data[:100_000], "cut.tar.gz")  # the headers and ~1 of 32 chunks
    with pytest.raises(UnsafeArchive, match="compression bomb"):
        archive.inspect_archive(cut, **CAPS)


def test_many_small_members_add_up_to_a_bomb(tmp_path):
    """No single member is over the floor; together they are 1000x the archive."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(6):
            zf.writestr(f"shard-{i}.bin", bytes(8 * MB))
    path = _write(tmp_path, buf.getvalue(), "many.zip")
    with pytest.raises(UnsafeArchive, match="times its size") as exc:
        archive.inspect_archive(path, **CAPS)
    assert exc.value.member.startswith("shard-")


def test_weights_that_compress_normally_pass(tmp_path):
    """Random weights (what models are) and small text files are never a bomb."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", json.dumps({"a": "b" * 10_000}))
        zf.writestr("model.safetensors", os.urandom(40 * MB))
    path = _write(tmp_path, buf.getvalue(), "ok.zip")
    members = archive.inspect_archive(path, **CAPS)
    assert {m.name for m in members} == {"config.json", "model.safetensors"}


def test_a_million_member_zip_is_refused_before_zipfile_parses_it(tmp_path):
    """Issue 10: a zip with a million empty members cost 646 MB before it was refused. Its
    count is read from the zip64 end records: refused reading a few hundred bytes."""
    path = _write(tmp_path, h.zip_million_members(1_000_000), "million.zip")
    exc, peak, seconds = _refusal(lambda: archive.inspect_archive(path, **CAPS))
    assert isinstance(exc, UnsafeArchive) and "more than 10000 members" in str(exc), exc
    assert peak < 2 * MB and seconds < 5, (peak, seconds)
    exc, peak, _ = _refusal(lambda: check_source_archive(path, Settings(data_dir=tmp_path / "d")))
    assert isinstance(exc, UnsafeArchive) and peak < 2 * MB
    print(f"[bombs] million-member zip ({path.stat().st_size >> 20} MiB) refused in {seconds:.3f} s, "
          f"peak {peak >> 10} KiB")


def test_a_zip_whose_end_record_lies_about_its_count(tmp_path):
    """zipfile trusts the directory's size, not its count: the directory is walked (fixed-size
    entry headers only) and refused at entry max_members + 2."""
    data = bytearray(h.zip_million_members(20_000))
    assert data[-22:-18] == b"PK\x05\x06"
    data[-14:-10] = (3).to_bytes(2, "little") * 2  # "3 entries"
    path = _write(tmp_path, bytes(data), "liar.zip")
    exc, peak, _ = _refusal(lambda: archive.inspect_archive(path, **CAPS))
    assert isinstance(exc, UnsafeArchive) and "more than 10000 members" in str(exc), exc
    assert peak < 2 * MB


def test_tar_entries_are_counted_while_streaming(tmp_path):
    """Root entries ("./") count too: a tar of 30,000 of them is refused at entry 10,002."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for _ in range(30_000):
            tf.addfile(tarfile.TarInfo("./"))
    path = _write(tmp_path, buf.getvalue(), "roots.tar.gz")
    with pytest.raises(UnsafeArchive, match="more than 10000 members"):
        archive.inspect_archive(path, **CAPS)


def _meta_header_bomb(kind: bytes) -> bytes:
    """A tar whose first header is a pax ('x') or GNU long-name ('L') record claiming 2 GiB:
    tarfile would read the whole claimed body into memory."""
    ti = tarfile.TarInfo("././@LongLink" if kind == b"L" else "./PaxHeaders/x")
    ti.type = kind
    ti.size = 2 << 30
    head = ti.tobuf(format=tarfile.GNU_FORMAT)
    return gzip.compress(head + bytes(64 * 1024), mtime=0)


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_tar_metadata_headers_are_capped(kind, tmp_path):
    path = _write(tmp_path, _meta_header_bomb(kind), "meta.tar.gz")
    exc, peak, _ = _refusal(lambda: archive.inspect_archive(path, **CAPS))
    assert isinstance(exc, UnsafeArchive) and "metadata header" in str(exc), exc
    assert peak < 4 * MB


def test_sparse_members_are_refused(tmp_path):
    ti = tarfile.TarInfo("model.safetensors")
    ti.type = tarfile.GNUTYPE_SPARSE
    ti.size = 0
    path = _write(tmp_path, gzip.compress(ti.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024)), "sparse.tar.gz")
    with pytest.raises((UnsafeArchive, InvalidArchive), match="sparse"):
        archive.inspect_archive(path, **CAPS)


def test_nested_archives_are_files_never_unpacked(bombs, tmp_path):
    """A bomb inside an archive is a 2 MB file like any other: stored, never opened."""
    inner = bombs["zip"].read_bytes()
    path = _write(tmp_path, archives.model_tar_gz({**archives.model_files(), "weights.zip": inner}), "outer.tar.gz")
    out = archive.extract_archive(path, tmp_path / "out", **CAPS)
    assert "weights.zip" in {m.name for m in out}
    assert (tmp_path / "out" / "weights.zip").read_bytes() == inner
    assert _unpacked_bytes(tmp_path / "out") < len(inner) + MB


def test_unpacked_cap_default_is_sane_next_to_the_upload_cap():
    s = Settings()
    assert s.max_unpacked_bytes <= 2 * s.max_upload_bytes  # was 200 GiB for 50 GiB uploads


# ----------------------------------------------------------------------- config-size bombs

_PREFLIGHT_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from quantyard.engine import parse_target, preflight
    from quantyard.engine.errors import ConversionError
    out = []
    for folder in sys.argv[1:]:
        try:
            preflight(Path(folder), [parse_target("gguf:Q8_0"), parse_target("gguf:F16")])
            out.append({"code": None})
        except ConversionError as exc:
            out.append({"code": exc.code, "message": exc.message, "details": exc.details})
        except BaseException as exc:
            out.append({"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"[:500]})
    # VmHWM: this process's own peak. getrusage's ru_maxrss is not: Linux keeps the peak of the
    # memory the process had before exec, i.e. the (large) pytest that forked it.
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    out.append({"max_rss_kib": int(hwm.split()[1])})
    print(json.dumps(out))
""")


def run_limited(script: str, *args: str, as_bytes: int | None = None, data_bytes: int | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c script args` in a child whose address space / data segment is capped, so a
    regression (a bomb that allocates) dies there instead of exhausting the machine."""
    import resource

    def limit() -> None:
        if as_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        if data_bytes:
            resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, data_bytes))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, preexec_fn=limit, timeout=timeout)


def _model_with(tiny_llama_dir: Path, dest: Path, **changes) -> Path:
    """The model with config.json changed: a fresh config file beside links to the (shared,
    cached, never written) weights and tokenizer files."""
    dest.mkdir(parents=True)
    for p in tiny_llama_dir.iterdir():
        if p.is_file() and p.name != "config.json":
            (dest / p.name).symlink_to(p)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


CONFIG_BOMBS = {
    # the probes of issue 10, then configs that are in range but disagree with the tensors
    "layers 1e6": ({"num_hidden_layers": 1_000_000}, "num_hidden_layers"),
    "vocab 1e12": ({"vocab_size": 10**12}, "vocab_size"),
    "vocab 1e12 as a float": ({"vocab_size": 1e12}, "vocab_size"),
    "hidden 1e9": ({"hidden_size": 10**9}, "hidden_size"),
    "intermediate 2^62": ({"intermediate_size": 2**62}, "intermediate_size"),
    "positions 1e12": ({"max_position_embeddings": 10**12}, "max_position_embeddings"),
    "layers as a string": ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    "layers true": ({"num_hidden_layers": True}, "num_hidden_layers"),
    "3 layers over 2": ({"num_hidden_layers": 3}, "num_hidden_layers"),
    "vocab over the embedding": ({"vocab_size": 4000}, "vocab_size"),
    "hidden over the embedding": ({"hidden_size": 512}, "hidden_size"),
}


def test_config_size_bombs_are_invalid_at_preflight_with_bounded_memory(tiny_llama_dir, tmp_path):
    """Issue 10: num_hidden_layers 1e6 drove a worker past 15 GB, vocab_size 1e12 to 8 GB.
    Each is refused by preflight from config.json and the headers; the child that runs them all
    lives under a 3 GiB address-space limit and its peak RSS is measured."""
    folders = [_model_with(tiny_llama_dir, tmp_path / f"m{i}", **changes)
               for i, (changes, _) in enumerate(CONFIG_BOMBS.values())]
    folders.append(tiny_llama_dir)  # the unchanged model passes (the checks can also say yes)
    run = run_limited(_PREFLIGHT_CHILD, *map(str, folders), as_bytes=3 << 30)
    assert run.returncode == 0, run.stderr[-3000:]
    *results, ok, usage = json.loads(run.stdout.splitlines()[-1])
    for (case, (_, field)), result in zip(CONFIG_BOMBS.items(), results, strict=True):
        assert result["code"] == "invalid_model", (case, result)
        assert result["message"].startswith("config.json: ") and field in result["message"], (case, result)
        assert result["details"] == {"file": "config.json", "field": field}
        _no_path(result["message"], tmp_path)
    assert ok == {"code": None}, ok
    assert usage["max_rss_kib"] < 1 << 20, f"preflight child peaked at {usage['max_rss_kib'] >> 10} MiB"
    print(f"[bombs] {len(CONFIG_BOMBS)} config bombs refused at preflight; child peak RSS "
          f"{usage['max_rss_kib'] >> 10} MiB")


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "phi3", "BertForSequenceClassification",
                                    "DistilBertModel", "XLMRobertaModel"])
def test_size_agreement_holds_across_families(family):
    """Each family names its layers and sizes its own way (h.N / layers.N / encoder.layer.N,
    n_layer / num_hidden_layers / n_layers, text_config): the real config passes, one more
    layer or a larger vocab does not."""
    from quantyard.engine.errors import InvalidModel
    from quantyard.engine.hf import sanity
    from quantyard.engine.hf.source import checked_tensors, load_config
    from tests.fixtures.models import arch_model
    from tests.fixtures.onnx_encoders import encoder_model

    folder = encoder_model(family) if family[0].isupper() else arch_model(family)
    config = load_config(folder)
    shapes = {n: t.shape for n, t in checked_tensors(folder, config).items()}
    for field in ("num_hidden_layers", "vocab_size"):
        scope = config.get("text_config") or config
        key = next(k for k in sanity.SIZE_FIELDS[field][0] if k in scope)
        bad = json.loads(json.dumps(config))
        (bad.get("text_config") or bad)[key] = scope[key] + 1
        with pytest.raises(InvalidModel, match=f"config.json: .*{field}"):
            sanity.check_against_tensors(bad, shapes)


def test_memory_estimate_over_the_limit_is_a_resource_limit(tiny_llama_dir):
    from quantyard.engine import parse_target, preflight
    from quantyard.engine.errors import ResourceLimit

    with pytest.raises(ResourceLimit) as exc:
        preflight(tiny_llama_dir, [parse_target("gguf:Q8_0")], memory_limit_bytes=256 * MB)
    assert exc.value.code == "resource_limit" and not exc.value.retryable
    assert "GiB of memory" in exc.value.message
    assert preflight(tiny_llama_dir, [parse_target("gguf:Q8_0")], memory_limit_bytes=8 << 30).parameter_count > 0


# ------------------------------------------------------------------ the worker under limits


@pytest.fixture
def runtime(tmp_path):
    from quantyard import catalog
    from worker.runtime import build_runtime

    settings = Settings(data_dir=tmp_path / "data", job_lease_s=3, job_max_attempts=1)
    settings.data_dir.mkdir()
    catalog.upgrade_database(settings.resolved_database_url)
    return build_runtime(settings, worker_id="bombs-worker")


def _source(runtime, folder: Path, tmp_path: Path, name: str = "src") -> str:
    from quantyard import catalog

    tar = tmp_path / f"{name}.tar.gz"
    with tarfile.open(tar, "w:gz", dereference=True) as tf:
        tf.add(folder, arcname=name)
    stored = runtime.store.put_file(f"sources/test/{name}.tar.gz", tar)
    with runtime.session() as s:
        source = catalog.create_source(
            s, name=name, sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri,
            storage_key=stored.key, architecture="LlamaForCausalLM", metadata={}, actor="test", request=None)
        s.commit()
        return source.id


def _job(runtime, source_id: str, quants: list[str]) -> str:
    from quantyard import catalog

    with runtime.session() as s:
        job = catalog.create_job(s, source_id=source_id, hardware_class="cpu", labels={}, actor="test",
                                 request=None, targets=[{"format": "gguf", "quantization": q, "params": {}}
                                                        for q in quants])
        s.commit()
        return job.id


def _job_dict(runtime, job_id: str) -> dict:
    from quantyard import catalog

    with runtime.session() as s:
        return catalog.get_job(s, job_id=job_id).to_dict()


def _run(runtime, job_id: str) -> None:
    from worker.pipeline import run_job
    from worker.target_pipeline import run_target

    dispatched: list[tuple] = []
    run_job(runtime, job_id, lambda *args: dispatched.append(args))
    for args in dispatched:
        run_target(runtime, *args)


def test_a_layer_bomb_fails_the_job_at_preflight_and_frees_scratch(runtime, tiny_llama_dir, tmp_path):
    """The worker side of issue 10's probe: the job fails invalid_model naming the field, no
    artifact is stored and the scratch folder is empty."""
    folder = _model_with(tiny_llama_dir, tmp_path / "bomb", num_hidden_layers=1_000_000)
    job_id = _job(runtime, _source(runtime, folder.resolve(), tmp_path), ["Q8_0"])
    _run(runtime, job_id)
    job = _job_dict(runtime, job_id)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "invalid_model", job["error"]
    assert "config.json: num_hidden_layers is 1000000" in job["error"]["message"]
    _no_path(job["error"]["message"], tmp_path)
    assert runtime.store.list_keys("artifacts/") == []
    assert list(runtime.scratch_dir.iterdir()) == []


def test_scratch_quota_fails_the_conversion_with_resource_limit(tiny_llama_dir, tmp_path):
    from quantyard import catalog
    from worker.runtime import build_runtime

    settings = Settings(data_dir=tmp_path / "data", job_lease_s=3, job_max_attempts=1,
                        conversion_scratch_bytes=1 * MB)  # the unpacked source alone is more
    settings.data_dir.mkdir()
    catalog.upgrade_database(settings.resolved_database_url)
    rt = build_runtime(settings, worker_id="quota-worker")
    job_id = _job(rt, _source(rt, tiny_llama_dir, tmp_path), ["Q8_0"])
    _run(rt, job_id)
    job = _job_dict(rt, job_id)
    errors = [job["error"]] + [t.get("error") for t in job["targets"]]
    codes = {e["code"] for e in errors if e}
    assert "resource_limit" in codes, job
    message = next(e["message"] for e in errors if e and e["code"] == "resource_limit")
    assert "scratch" in message and "limit" in message
    _no_path(message, tmp_path)
    assert rt.store.list_keys("artifacts/") == [] and list(rt.scratch_dir.iterdir()) == []


def test_allocation_failures_and_time_limits_are_resource_limits():
    """What torch, numpy and Celery raise when a limit is hit, mapped by worker.limits; run
    under a 2 GiB data limit so the allocations fail the same way on any machine."""
    script = textwrap.dedent("""
        import json
        import numpy as np, torch
        from billiard.exceptions import SoftTimeLimitExceeded
        from quantyard.engine.errors import InvalidModel
        from quantyard.settings import Settings
        from worker.limits import resource_limit_of
        settings = Settings(task_time_limit_s=600)
        out = {}
        def probe(name, fn):
            try:
                fn()
                out[name] = None
            except BaseException as exc:
                limit = resource_limit_of(exc, settings)
                out[name] = [type(exc).__name__, limit and limit.code, limit and limit.message]
        probe("numpy", lambda: np.ones(4 << 30, dtype=np.uint8))
        probe("torch", lambda: torch.ones(4 << 30, dtype=torch.uint8))
        probe("bytes", lambda: bytearray(4 << 30))
        def wrapped():
            try:
                np.ones(4 << 30, dtype=np.uint8)
            except MemoryError as e:
                raise InvalidModel("could not read the weights") from e
        probe("wrapped", wrapped)
        def soft():
            raise SoftTimeLimitExceeded()
        probe("time", soft)
        probe("other", lambda: 1 / 0)
        print(json.dumps(out))
    """)
    run = run_limited(script, data_bytes=2 << 30)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    for name in ("numpy", "torch", "bytes", "wrapped"):
        assert out[name][1] == "resource_limit" and "out of memory" in out[name][2], (name, out[name])
    assert out["time"][1:] == ["resource_limit", "the conversion ran past its time limit of 540 s"]
    assert out["other"][1] is None  # a bug stays internal_error


_LIMITED_WORKER = textwrap.dedent("""
    import json, resource, sys, tarfile
    from pathlib import Path
    from quantyard import catalog
    from quantyard.settings import Settings
    from worker import limits
    from worker.pipeline import run_job
    from worker.runtime import build_runtime
    from worker.target_pipeline import run_target

    data_dir, model, headroom = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    # conversion_memory_bytes=0: no preflight estimate, so the limit is met while converting
    settings = Settings(data_dir=data_dir, job_lease_s=30, job_max_attempts=1, conversion_memory_bytes=0)
    data_dir.mkdir()
    catalog.upgrade_database(settings.resolved_database_url)
    rt = build_runtime(settings, worker_id="limited")
    tar = data_dir / "src.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(model, arcname="m")
    stored = rt.store.put_file("sources/t/src.tar.gz", tar)

    def job(quant):
        with rt.session() as s:
            src = catalog.create_source(s, name=f"m-{quant}", sha256=stored.sha256, size_bytes=stored.size_bytes,
                                        uri=stored.uri, storage_key=stored.key, architecture="LlamaForCausalLM",
                                        metadata={}, actor="t", request=None)
            j = catalog.create_job(s, source_id=src.id, hardware_class="cpu", labels={}, actor="t", request=None,
                                   targets=[{"format": "gguf", "quantization": quant, "params": {}}])
            s.commit()
            job_id = j.id
        sent = []
        run_job(rt, job_id, lambda *a: sent.append(a))
        for a in sent:
            run_target(rt, *a)
        with rt.session() as s:
            return catalog.get_job(s, job_id=job_id).to_dict()

    import llama_cpp, numpy, torch, transformers  # a worker that converted before has them loaded
    baseline = int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1]) * 1024
    limits.apply_memory_limit(baseline + headroom)
    first = job("F16")
    # the same process goes on: with the limit lifted it converts the model
    resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    second = job("F16")
    print(json.dumps({"first": first, "second": second, "baseline": baseline,
                      "scratch": [p.name for p in rt.scratch_dir.iterdir()]}, default=str))
""")


@pytest.fixture(scope="module")
def wide_llama_dir() -> Path:
    """tiny_llama with hidden 1024 / FFN 4096: ~35M parameters, a 140 MB float32 reference."""
    from tests.fixtures.models import cached_model, make_tiny_llama

    return cached_model("tiny-llama-wide", make_tiny_llama, hidden_size=1024, intermediate_size=4096,
                        num_heads=8, num_kv_heads=4)


def test_a_conversion_over_its_memory_limit_fails_cleanly_and_the_worker_survives(wide_llama_dir, tmp_path):
    """The worker's pool process under RLIMIT_DATA (what worker_process_init applies) with 64 MB
    of headroom: the conversion's allocations fail inside the task, the job ends resource_limit
    naming the limit, scratch is freed, and the same process then converts the model fine."""
    run = run_limited(_LIMITED_WORKER, str(tmp_path / "data"), str(wide_llama_dir), str(64 * MB),
                      as_bytes=None, timeout=600)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    out = json.loads(run.stdout.splitlines()[-1])
    first = out["first"]
    errors = [first["error"]] + [t.get("error") for t in first["targets"]]
    assert first["status"] == "failed", first
    assert "resource_limit" in {e["code"] for e in errors if e}, errors
    message = next(e["message"] for e in errors if e and e["code"] == "resource_limit")
    assert "out of memory" in message and "GiB" in message, message
    assert out["second"]["status"] == "succeeded", out["second"]
    assert out["scratch"] == []
    print(f"[bombs] memory limit baseline {out['baseline'] >> 20} MiB + 64 MiB: {message}")


def test_the_worker_pool_process_runs_under_the_memory_limit(tmp_path):
    """`quantyard worker` applies QUANTYARD_CONVERSION_MEMORY_BYTES to its pool process
    (worker_process_init), not to the main process that must outlive a failed conversion."""
    import signal

    from tests.e2e.conftest import clean_env

    limit = 3 << 30
    env = clean_env(HOME=str(tmp_path), QUANTYARD_CONVERSION_MEMORY_BYTES=str(limit))
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "quantyard.cli", "worker"], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def data_limit(pid: int) -> str:
            line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines()
                        if ln.startswith("Max data size"))
            return line.split()[3]

        deadline = time.monotonic() + 90
        children: list[int] = []
        while time.monotonic() < deadline and not children:
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            time.sleep(0.5)
        assert children, "no pool process started"
        deadline = time.monotonic() + 30  # worker_process_init runs just after the fork
        while data_limit(children[0]) != str(limit) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert data_limit(children[0]) == str(limit)
        assert data_limit(proc.pid) != str(limit)  # the main process keeps its own
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
