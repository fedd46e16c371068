"""The atheris fuzzers of fuzz/, each for a bounded time (CI); scripts/fuzz.sh runs them longer.

Each target replays its checked-in seeds (fuzz/corpus/<target>/, regression inputs included) and
then mutates them for FUZZ_SECONDS; any exception outside the parser's documented errors, an
input over the memory limit (-rss_limit_mb) or over the time limit per input is a failure, shown
with libFuzzer's report and the crashing input's path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FUZZ = REPO / "fuzz"
TARGETS = ("safetensors_header", "gguf_header", "archive", "program_vetting")
FUZZ_SECONDS = int(os.environ.get("QUANTYARD_FUZZ_SECONDS", "15"))
FUZZ_SEED = int(os.environ.get("QUANTYARD_FUZZ_SEED", "1"))


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_nothing(target, tmp_path):
    import atheris  # noqa: F401  (in the test extra; missing it is a failure, not a skip)

    seeds = FUZZ / "corpus" / target
    assert len(list(seeds.iterdir())) >= 2, f"the seed corpus of {target} is missing"
    grown, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    grown.mkdir()
    artifacts.mkdir()
    cmd = [sys.executable, str(FUZZ / f"fuzz_{target}.py"), str(grown), str(seeds),
           f"-max_total_time={FUZZ_SECONDS}", f"-artifact_prefix={artifacts}/", "-print_final_stats=1",
           # a fixed seed: CI replays the same mutations each run (a red CI is a regression, not a
           # lucky draw); scripts/fuzz.sh explores with random seeds
           f"-seed={FUZZ_SEED}"]
    # Through sh, which forks: libFuzzer's -rss_limit_mb reads getrusage's peak, and Linux keeps the
    # peak of the process image before exec, so a fuzzer exec'd straight from a large pytest
    # starts "over the limit". The forked child of sh starts its count afresh.
    run = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *cmd], cwd=tmp_path, capture_output=True, text=True,
                         timeout=FUZZ_SECONDS + 240,
                         env={k: v for k, v in os.environ.items() if k != "QUANTYARD_FUZZ_FINDINGS"})
    found = sorted(p.name for p in artifacts.iterdir())
    report = run.stdout[-3000:] + run.stderr[-6000:]
    assert run.returncode == 0 and not found, f"{target}: rc {run.returncode}, inputs {found}\n{report}"
    runs = [line for line in run.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[-1].split(":")[-1]) > 0, f"{target} executed no input\n{report}"
