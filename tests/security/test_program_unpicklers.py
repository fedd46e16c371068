"""Proof that loading a program unpickles nothing except through torch's weights_only
unpickler: every unpickler torch can reach is instrumented (tests/security/program_unpicklers.py)
while a genuine torch.export.save archive (weights, constants, sample inputs) loads, in this
process and in the sandboxed child that really loads programs; the same instrument catches
torch.export.load's own fallback to weights_only=False, so the test can fail."""

from __future__ import annotations

import contextlib
import datetime
import pickle
from pathlib import Path

import pytest

from quantyard.engine import sandbox
from quantyard.engine.onnx.program import describe, load_torch, vet_pt2
from tests.security.program_unpicklers import Recorder
from tests.security.test_program_uploads import PT2_CASES, TOP, make_genuine, rezip

LIMITS = sandbox.Limits(memory_bytes=6 << 30, cpu_seconds=120, wall_seconds=120.0)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> dict[str, bytes]:
    return make_genuine(tmp_path_factory.mktemp("genuine"))


def _write(tmp_path: Path, data: bytes) -> Path:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    (folder / f"{TOP}.pt2").write_bytes(data)
    return folder


def _in_child(tmp_path: Path, target: str, **kwargs) -> dict:
    return sandbox.run(f"tests.security.program_sandbox_targets:{target}", kwargs, scratch=tmp_path / "scratch",
                       limits=LIMITS, label=f"{TOP}.pt2", readable=[tmp_path]).value


def test_a_genuine_program_loads_through_weights_only_alone(genuine, tmp_path):
    import torch

    folder = _write(tmp_path, genuine["pt2"])
    with Recorder() as plain:
        vet_pt2(folder / f"{TOP}.pt2")
        torch.export.load(folder / f"{TOP}.pt2")
    assert plain.unsafe == [], plain.unsafe
    assert any("weights_only=True" in s for s in plain.safe), plain.safe  # the sample inputs
    with Recorder() as ours:
        program = load_torch(describe(folder))
    assert ours.unsafe == [] and ours.safe, ours.report()
    assert program.names == ("x",)
    child = _in_child(tmp_path, "instrumented_load", root=str(folder))
    assert child["outcome"] == "loaded" and child["unsafe"] == [] and child["safe"], child


def test_the_instrument_sees_torchs_own_unsafe_fallback(genuine, tmp_path):
    """A legacy data/weights/model.pt holding a harmless non-tensor object: torch.export.load
    tries weights_only=True, fails, and unpickles it with weights_only=False."""
    import torch

    harmless = pickle.dumps({"w": datetime.date(2020, 1, 1)}, protocol=2)
    path = _write(tmp_path, rezip(genuine["pt2"], add=[(f"{TOP}/data/weights/model.pt", harmless)])) / f"{TOP}.pt2"
    with Recorder() as rec, contextlib.suppress(Exception):
        torch.export.load(path)
    assert any("weights_only=False" in u for u in rec.unsafe), rec.report()
    child = _in_child(tmp_path, "instrumented_load", root=str(path.parent))
    assert child["outcome"].startswith("InvalidModel") and child["unsafe"] == [], child


def test_whatever_the_vetting_accepts_torch_loads_weights_only(genuine, tmp_path):
    """For every hostile archive of test_program_uploads: vet_pt2 refuses it, or plain
    torch.export.load of it (in the sandbox, without Quantyard's guard) makes no unpickle
    outside weights_only. One child for all of them."""
    marker = tmp_path / "scratch" / "pwned"
    paths = []
    for case_id, build, *_ in PT2_CASES:
        folder = tmp_path / case_id
        folder.mkdir()
        (folder / f"{TOP}.pt2").write_bytes(build(genuine, marker))
        paths.append(str(folder / f"{TOP}.pt2"))
    reports = _in_child(tmp_path, "raw_load_if_vetted", paths=paths)
    assert len(reports) == len(PT2_CASES)
    for (case_id, *_), report in zip(PT2_CASES, reports, strict=True):
        assert report["unsafe"] == [], (case_id, report)
    accepted = [c[0] for c, r in zip(PT2_CASES, reports, strict=True) if not r["outcome"].startswith("refused")]
    assert accepted == ["raw-weight-is-a-pickle"], accepted  # raw bytes: read as floats, never unpickled
    assert not marker.exists()
