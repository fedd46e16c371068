"""worker/scratch.py on real processes: a SIGKILLed process's folders go, a live one's stay."""

from __future__ import annotations

import subprocess
import sys

from worker.scratch import is_dead_owner, owner_name, process_scratch_dir, sweep_scratch


def _child() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_folders_of_dead_processes_are_swept_live_ones_kept(tmp_path):
    live, dead = _child(), _child()
    try:
        dead_dir = tmp_path / owner_name(dead.pid)
        live_dir = tmp_path / owner_name(live.pid)
        for folder in (dead_dir, live_dir):
            (folder / "tgt_abc-123" / "out").mkdir(parents=True)
            (folder / "tgt_abc-123" / "out" / "model.gguf").write_bytes(b"x" * 1000)
        dead.kill()
        dead.wait()
        other_host = tmp_path / f"elsewhere-p{dead.pid}-1"  # a shared volume: not ours to judge
        other_host.mkdir()
        reused_pid = tmp_path / f"{owner_name(live.pid).rsplit('-', 1)[0]}-1"  # same pid, other start
        reused_pid.mkdir()
        (tmp_path / "not-an-owner").mkdir()

        mine = process_scratch_dir(tmp_path)  # a new process's folder sweeps the dead ones

        assert mine.name == owner_name() and mine.is_dir()
        assert not dead_dir.exists() and not reused_pid.exists()
        assert (live_dir / "tgt_abc-123" / "out" / "model.gguf").exists()
        assert other_host.exists() and (tmp_path / "not-an-owner").exists()
        assert not is_dead_owner(mine.name) and not is_dead_owner(live_dir.name)
        assert sweep_scratch(tmp_path) == []  # nothing more to do
    finally:
        live.kill()
        live.wait()
    assert sweep_scratch(tmp_path) == [live_dir.name]
