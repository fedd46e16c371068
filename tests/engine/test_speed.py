"""measure_speed against llama.cpp's own llama-bench (`-o json`) on SmolLM2-135M, cheap settings
(-p 64 -n 16 -r 2). Speeds are noisy on a shared 2-core VM: the rates must be of the same order
of magnitude as llama-bench's, the settings (threads, batch sizes, token counts) exactly its."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from quantyard.engine.gguf.speed import measure_speed
from tests.fixtures.smollm2 import SmolLM2Unavailable, smollm2_gguf_path

from ._llama_tools import PREFIX, _build_running, _required

N_PROMPT, N_GEN, REPS = 64, 16, 2
BENCH = PREFIX / "bin" / "llama-bench"


def _llama_bench():
    deadline = time.monotonic() + 45 * 60
    while not BENCH.is_file() and _build_running() and time.monotonic() < deadline:
        time.sleep(10)
    if not BENCH.is_file():
        message = f"llama-bench missing at {BENCH}: run `bash scripts/build-llama-tools.sh`"
        if _required():
            pytest.fail(message, pytrace=False)
        pytest.skip(f"!!! SKIPPED: {message}; with CI or QUANTYARD_REQUIRE_SERVICES=1 this is a failure.")
    return BENCH


@pytest.fixture(scope="module")
def smollm2_gguf():
    try:
        return smollm2_gguf_path()
    except SmolLM2Unavailable as exc:
        if _required():
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(f"!!! SKIPPED, MODEL MISSING: {exc}")


def test_measure_speed_agrees_with_llama_bench(smollm2_gguf):
    bench = _llama_bench()
    ours = measure_speed(smollm2_gguf, n_prompt=N_PROMPT, n_gen=N_GEN, repetitions=REPS)
    d = ours.to_dict()
    # llama-bench with the same extra buffer types (repacked weights; off where AMX is, see
    # speed.py): the tools are built for this CPU, as llama-cpp-python is
    r = subprocess.run([str(bench), "-m", str(smollm2_gguf), "-p", str(N_PROMPT), "-n", str(N_GEN),
                        "-r", str(REPS), "--repack", "1" if d["extra_buffers"] else "0", "-o", "json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    pp = next(t for t in rows if t["n_prompt"] == N_PROMPT and t["n_gen"] == 0)
    tg = next(t for t in rows if t["n_prompt"] == 0 and t["n_gen"] == N_GEN)
    # the same test as llama-bench's defaults: its thread count, batch sizes, token counts
    assert d["threads"] == pp["n_threads"] == tg["n_threads"]
    assert (d["n_batch"], d["n_ubatch"]) == (pp["n_batch"], pp["n_ubatch"])
    assert (d["n_prompt"], d["n_gen"], d["repetitions"]) == (N_PROMPT, N_GEN, REPS)
    assert len(pp["samples_ts"]) == REPS
    # the same order of magnitude (a 2-core VM shared with other jobs: no tighter claim)
    for mine, theirs in ((d["pp_tokens_per_s"], pp["avg_ts"]), (d["tg_tokens_per_s"], tg["avg_ts"])):
        assert theirs / 5 < mine < theirs * 5, (mine, theirs)
    # batched prompt processing beats one-token generation in both (prompt decoded in batches)
    assert d["pp_tokens_per_s"] > d["tg_tokens_per_s"] and pp["avg_ts"] > tg["avg_ts"]
    assert d["pp_stddev"] >= 0 and d["runtime"].startswith("llama.cpp")


@pytest.mark.parametrize("kwargs, word", [({"threads": 0}, "threads"), ({"n_prompt": 10**6}, "n_prompt"),
                                          ({"n_gen": -1}, "n_gen"), ({"repetitions": 0}, "repetitions"),
                                          ({"threads": True}, "threads")])
def test_measure_speed_refuses_bad_settings_before_loading(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        measure_speed(tmp_path / "never-read.gguf", **kwargs)
