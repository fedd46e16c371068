"""The operating-system half of the sandbox (Linux): limits, namespaces, seccomp.

Each function applies one protection to the calling process and answers whether it took
effect, so a worker that lacks the privilege (namespaces need root) degrades to what it can
do and says so. Called only in the sandbox's child, before any untrusted byte is parsed.
"""

from __future__ import annotations

import ctypes
import platform
import resource
import struct
from collections.abc import Sequence
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def set_limits(limits) -> bool:
    """RLIMIT_AS / CPU / FSIZE / NOFILE as given, and never a core dump (it would hold the
    model's bytes and land wherever the kernel is told)."""
    pairs = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, limits.open_files)]
    if limits.memory_bytes:
        pairs.append((resource.RLIMIT_AS, limits.memory_bytes))
    if limits.file_bytes:
        pairs.append((resource.RLIMIT_FSIZE, limits.file_bytes))
    for which, value in pairs:
        resource.setrlimit(which, (value, value))
    if limits.cpu_seconds:  # SIGXCPU at the soft limit, SIGKILL a little later
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
    return True


def leave_network() -> bool:
    """A new network namespace: no interface but a downed loopback, so nothing is reachable."""
    return _libc().unshare(CLONE_NEWNET) == 0


def read_only_except(writable: Sequence[Path]) -> bool:
    """A private mount namespace in which every mount is read-only except bind mounts of
    `writable` (the scratch folder, the output folder). True only if all of that worked."""
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    keep = [str(Path(w).resolve()) for w in writable]
    for path in keep:
        if libc.mount(path.encode(), path.encode(), None, MS_BIND | MS_REC, None) != 0:
            return False
    ok = True
    for point in sorted(_mount_points(), key=len):
        if point in keep:
            continue
        if libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0 and point == "/":
            ok = False  # others (e.g. /proc submounts the kernel refuses) do not expose files to write
    return ok


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                points.append(fields[4].encode().decode("unicode_escape"))  # \040 for spaces
    return points


# x86-64 syscall numbers the filter refuses (EPERM): starting programs, debugging other
# processes, changing mounts or namespaces, loading kernel code, raw kernel interfaces
_DENIED = {"execve": 59, "execveat": 322, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
           "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
           "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
           "kexec_file_load": 320, "bpf": 321, "perf_event_open": 298, "open_by_handle_at": 304,
           "keyctl": 250, "add_key": 248, "request_key": 249, "userfaultfd": 323, "reboot": 169,
           "swapon": 167, "swapoff": 168}
_SOCKET, _AF_UNIX = 41, 1
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_ALLOW, _KILL, _EPERM = 0x7FFF0000, 0x80000000, 0x00050000 | 1


def _seccomp_program() -> list[tuple[int, int, int, int]]:
    """Classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}."""
    prog = [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64), (_RET_K, 0, 0, _KILL),
            (_LD_W_ABS, 0, 0, 0), (_JGE_K, 0, 1, _X32_BIT), (_RET_K, 0, 0, _EPERM)]
    for nr in sorted(_DENIED.values()):
        prog += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, _EPERM)]
    # socket(domain, ...): AF_UNIX only (the low 32 bits of args[0] sit at offset 16)
    prog += [(_JEQ_K, 0, 3, _SOCKET), (_LD_W_ABS, 0, 0, 16), (_JEQ_K, 1, 0, _AF_UNIX), (_RET_K, 0, 0, _EPERM),
             (_RET_K, 0, 0, _ALLOW)]
    return prog


def install_seccomp() -> bool | str:
    """no_new_privs, then the filter (unprivileged processes may install one after that)."""
    if platform.machine() != "x86_64":
        return f"unavailable on {platform.machine()}"
    libc = _libc()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    prog = _seccomp_program()
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


__all__ = ["install_seccomp", "leave_network", "read_only_except", "set_limits"]
