"""What every fuzz target shares: libFuzzer defaults (memory, input size, time per input), a
scratch file to hand bytes to parsers that take paths, and the rule that only the parser's
documented typed errors may escape (anything else propagates and atheris reports a crash).

Run a target directly (`python fuzz/fuzz_archive.py CORPUS_DIR -max_total_time=60`); flags given
on the command line win over the defaults here. scripts/fuzz.sh runs them all for longer and
tests/security/test_fuzz.py for a few seconds each in CI.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `quantyard` importable from the checkout
    sys.path.insert(0, str(REPO_ROOT))

# Defaults: an input that makes a parser allocate more than this (or run longer) is a finding.
RSS_LIMIT_MB = 2048
TIMEOUT_S = 20


class Scratch:
    """One private directory per fuzzing process; `write(data, name)` puts bytes in a file there."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="quantyard-fuzz-"))

    def write(self, data: bytes, name: str = "input") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def fresh_dir(self, name: str) -> Path:
        """An empty directory (removed and made again for every input)."""
        import shutil

        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


def guarded(parse, allowed: tuple[type[BaseException], ...], *, max_len: int):
    """The libFuzzer entry point: inputs over `max_len` are skipped; `allowed` errors are the
    parser refusing the input (fine); every other exception escapes and is a finding.

    With QUANTYARD_FUZZ_FINDINGS=<dir> (long runs, scripts/fuzz.sh) a finding does not stop the
    run: the first input of each distinct finding (exception type + innermost project frame) is
    saved there with its traceback, and fuzzing goes on."""
    findings = os.environ.get("QUANTYARD_FUZZ_FINDINGS")
    seen: set[str] = set()

    def test_one_input(data: bytes) -> None:
        if len(data) > max_len:
            return
        try:
            parse(data)
        except allowed:
            pass
        except Exception as exc:
            if not findings:
                raise
            _record(Path(findings), seen, exc, data)

    return test_one_input


def _record(folder: Path, seen: set[str], exc: Exception, data: bytes) -> None:
    import hashlib
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if str(REPO_ROOT / "quantyard") in f.filename] or frames[-1:]
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    signature = f"{type(exc).__name__}@{where}"
    if signature in seen:
        return
    seen.add(signature)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"finding-{hashlib.sha1(signature.encode()).hexdigest()[:10]}"
    (folder / stem).write_bytes(data)
    (folder / f"{stem}.txt").write_text(f"{signature}\n\n{''.join(traceback.format_exception(exc))}")
    print(f"FINDING {signature} -> {folder / stem}", file=sys.stderr, flush=True)


def main(test_one_input, *, max_len: int, dictionary: str | None = None) -> None:
    """Run libFuzzer with the defaults below (command-line flags win); `dictionary` names a file
    in fuzz/dicts/ of tokens the format uses (JSON keys, magic bytes) to splice into inputs."""
    import atheris

    argv = list(sys.argv)
    defaults = {"-max_len": max_len, "-rss_limit_mb": RSS_LIMIT_MB, "-malloc_limit_mb": RSS_LIMIT_MB,
                "-timeout": TIMEOUT_S}
    if dictionary:
        defaults["-dict"] = str(Path(__file__).resolve().parent / "dicts" / dictionary)
    for flag, value in defaults.items():
        if not any(a.startswith(flag + "=") for a in argv[1:]):
            argv.append(f"{flag}={value}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
