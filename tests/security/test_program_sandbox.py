"""quantyard.engine.sandbox on its own: a child that misbehaves costs a typed error, never this
process, and the protections hold even when the vetting is imagined away (a payload that is
unpickled without restriction inside the child cannot start a program, reach the network or,
as root, write outside its scratch and output folders)."""

from __future__ import annotations

import os
import pickle
import platform
import socket
import time

import pytest

from quantyard.engine import sandbox
from quantyard.engine.errors import Cancelled, InvalidModel, ResourceLimit
from tests.security.test_program_uploads import WritesMarker

T = "tests.security.program_sandbox_targets:"
LIMITS = sandbox.Limits(memory_bytes=3 << 30, cpu_seconds=60, wall_seconds=60.0, file_bytes=64 << 20, open_files=256)
ROOT = os.geteuid() == 0
X86 = platform.machine() == "x86_64"


def run(tmp_path, name: str, limits=LIMITS, **kwargs):
    return sandbox.run(T + name, kwargs, scratch=tmp_path / "scratch", limits=limits, label="model.pt2",
                       writable=[tmp_path / "out"])


@pytest.fixture(autouse=True)
def _out(tmp_path):
    (tmp_path / "out").mkdir()


def test_a_result_comes_back_as_json_with_the_protections(tmp_path):
    outcome = run(tmp_path, "spin", seconds=0.01)
    assert isinstance(outcome.value, int) and outcome.value > 0
    assert outcome.protections["rlimits"] is True
    assert outcome.protections["seccomp"] is (True if X86 else outcome.protections["seccomp"])
    assert outcome.protections["landlock"] is True or str(outcome.protections["landlock"]).startswith("unavailable")
    if ROOT:
        assert outcome.protections["network_namespace"] is True
        assert outcome.protections["read_only_filesystem"] is True


def test_the_peak_memory_is_the_childs_own_not_the_parents(tmp_path):
    """Linux keeps a process's peak RSS across exec, so wait4 would report the worker that
    spawned the child; the sandbox reports the child's own high-water mark."""
    ballast = bytearray(1536 << 20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touched: resident in this process
    small = run(tmp_path, "spin", seconds=0.01)
    assert 0 < small.peak_rss_bytes < 512 << 20, small.peak_rss_bytes
    big = run(tmp_path, "allocate", gib=0.75)
    assert big.peak_rss_bytes > small.peak_rss_bytes + (512 << 20), (small.peak_rss_bytes, big.peak_rss_bytes)
    del ballast


def _landlock() -> bool:
    """landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION): the ABI, or -1."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return platform.machine() == "x86_64" and libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)) >= 1


@pytest.mark.skipif(not _landlock(), reason="the kernel has no Landlock")
def test_nothing_readable_but_the_install_and_what_was_given(tmp_path):
    """Other tenants' files, the worker's configuration and its /proc entry (environ holds its
    credentials) are unreadable from the child."""
    secret = tmp_path / "catalog.sqlite3"
    secret.write_text("other tenants")
    with pytest.raises(InvalidModel, match="PermissionError"):
        run(tmp_path, "read_file", path=str(secret))
    with pytest.raises(InvalidModel, match="PermissionError|OSError"):
        run(tmp_path, "read_file", path=f"/proc/{os.getpid()}/environ")
    given = sandbox.run(T + "read_file", {"path": str(secret)}, scratch=tmp_path / "scratch", limits=LIMITS,
                        label="m", readable=[tmp_path])
    assert given.value == "other tenants"


def test_no_unix_sockets_either(tmp_path):
    """A local database socket would stay connectable on a read-only filesystem."""
    path = tmp_path / "db.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        server.settimeout(0.5)
        with pytest.raises(InvalidModel, match="PermissionError"):
            run(tmp_path, "connect_unix", path=str(path))
        with pytest.raises(TimeoutError):
            server.accept()


def test_memory_limit_is_resource_limit(tmp_path):
    with pytest.raises(ResourceLimit) as err:
        run(tmp_path, "allocate", limits=LIMITS, gib=4)
    assert err.value.code == "resource_limit" and err.value.details["limit"] == "memory"


def test_torch_allocation_over_the_limit_is_resource_limit(tmp_path):
    with pytest.raises(ResourceLimit):
        run(tmp_path, "torch_allocate", gib=6)


def test_cpu_limit_is_resource_limit(tmp_path):
    limits = sandbox.Limits(memory_bytes=1 << 30, cpu_seconds=1, wall_seconds=60.0)
    start = time.monotonic()
    with pytest.raises(ResourceLimit) as err:
        run(tmp_path, "spin", limits=limits, seconds=30)
    assert err.value.details["limit"] == "cpu" and time.monotonic() - start < 20


def test_wall_time_limit_kills_the_child(tmp_path):
    limits = sandbox.Limits(memory_bytes=1 << 30, cpu_seconds=60, wall_seconds=2.0)
    start = time.monotonic()
    with pytest.raises(ResourceLimit) as err:
        run(tmp_path, "sleep", limits=limits, seconds=60)
    assert err.value.details["limit"] == "time" and time.monotonic() - start < 10


def test_file_size_limit_is_resource_limit(tmp_path):
    with pytest.raises(ResourceLimit) as err:
        run(tmp_path, "write", path=str(tmp_path / "out" / "big"), mib=100)
    assert err.value.details["limit"] == "file_size"


def test_a_crash_is_invalid_model(tmp_path):
    with pytest.raises(InvalidModel) as err:
        run(tmp_path, "segfault")
    assert err.value.details["reason"] == "loader_crashed" and "SIGSEGV" in err.value.message
    with pytest.raises(InvalidModel, match="exit status 3"):
        run(tmp_path, "exit_without_result")


def test_cancel_while_waiting_kills_the_child(tmp_path):
    def cancel(_elapsed):
        raise Cancelled("cancelled")

    start = time.monotonic()
    with pytest.raises(Cancelled):
        sandbox.run(T + "sleep", {"seconds": 60}, scratch=tmp_path / "s", limits=LIMITS, label="m", on_wait=cancel,
                    poll_seconds=0.5)
    assert time.monotonic() - start < 10


def test_no_secrets_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTYARD_S3_SECRET_KEY", "hunter2")
    names = run(tmp_path, "environment").value
    assert "QUANTYARD_S3_SECRET_KEY" not in names and set(names) <= {
        "PATH", "HOME", "TMPDIR", "LANG", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "LC_CTYPE"}


@pytest.mark.skipif(not X86, reason="the seccomp filter is x86-64 only")
def test_a_payload_unpickled_in_the_child_cannot_start_a_program(tmp_path):
    """The marker pickle of the exploit, unpickled without restriction (as a loader bug
    would): os.system forks, but the exec of /bin/sh is refused."""
    marker = tmp_path / "out" / "pwned"  # even in a writable folder
    outcome = run(tmp_path, "unpickle", data_hex=pickle.dumps(WritesMarker(marker)).hex())
    assert outcome.value != "0"  # os.system's status: the shell never ran
    assert not marker.exists()
    with pytest.raises(InvalidModel, match="PermissionError"):
        run(tmp_path, "run_shell", marker=str(marker))
    assert not marker.exists()


def test_no_network(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        with pytest.raises(InvalidModel, match="OSError|PermissionError|ConnectionRefusedError"):
            run(tmp_path, "connect", port=server.getsockname()[1])
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever reached the listener


@pytest.mark.skipif(not ROOT, reason="a read-only view of the filesystem needs a mount namespace (root)")
def test_read_only_outside_scratch_and_output(tmp_path):
    outside = tmp_path / "outside.txt"
    with pytest.raises(InvalidModel, match="OSError"):
        run(tmp_path, "write_file", path=str(outside))
    assert not outside.exists()
    assert run(tmp_path, "write_file", path=str(tmp_path / "out" / "ok.txt")).value
    assert (tmp_path / "out" / "ok.txt").read_text() == "written from the sandbox"


def test_nothing_the_child_forked_outlives_it(tmp_path):
    pid = run(tmp_path, "fork_and_linger").value
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/status").read().split("State:")[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return  # gone
        if state == "Z":
            return  # killed, waiting for its new parent to reap it
        time.sleep(0.1)
    raise AssertionError(f"process {pid} forked in the sandbox is still running")
