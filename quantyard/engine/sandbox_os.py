"""The operating-system half of the sandbox (Linux): limits, namespaces, seccomp.

Each function applies one protection to the calling process and answers whether it took
effect, so a worker that lacks the privilege (namespaces need root) degrades to what it can
do and says so. Called only in the sandbox's child, before any untrusted byte is parsed.
"""

from __future__ import annotations

import ctypes
import os
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
# processes, changing mounts or namespaces, loading kernel code, raw kernel interfaces, sockets
_DENIED = {"execve": 59, "execveat": 322, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
           "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
           "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
           "kexec_file_load": 320, "bpf": 321, "perf_event_open": 298, "open_by_handle_at": 304,
           "keyctl": 250, "add_key": 248, "request_key": 249, "userfaultfd": 323, "reboot": 169,
           "swapon": 167, "swapoff": 168,
           # leaving the sandbox's process group would let a forked payload outlive the kill
           "setsid": 112, "setpgid": 109}
_SOCKET = 41
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
    # no socket at all: AF_UNIX sockets on the (read-only) filesystem stay connectable, e.g. a
    # database's local socket; a loader has no use for any
    prog += [(_JEQ_K, 0, 1, _SOCKET), (_RET_K, 0, 0, _EPERM), (_RET_K, 0, 0, _ALLOW)]
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


# ---------------------------------------------------------------- Landlock (unprivileged)

_LANDLOCK_CREATE, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT = 444, 445, 446
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1, 2, 4, 8
_FS_ALL_V1 = (1 << 13) - 1  # execute .. make_sym
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_ALL = 3  # bind and connect TCP
_SCOPE_ALL = 3  # abstract unix sockets and signals outside the sandbox
# what a Python process with torch reads besides its install: the dynamic loader's cache, CPU
# topology, its own /proc entry, a few devices
SYSTEM_READABLE = ("/usr", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf",
                   "/etc/passwd", "/etc/group", "/proc/cpuinfo", "/proc/meminfo", "/proc/self", "/proc/thread-self",
                   "/sys/devices/system/cpu", "/sys/fs/cgroup", "/dev/null", "/dev/zero", "/dev/urandom",
                   "/dev/random", "/dev/shm")


def _fs_rights(abi: int) -> int:
    rights = _FS_ALL_V1
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def restrict_filesystem(readable: Sequence[str | Path], writable: Sequence[Path]) -> bool | str:
    """Landlock: from now on this process reads only under `readable` (plus SYSTEM_READABLE) and
    writes only under `writable`; no TCP, no signals or abstract sockets outside (ABI >= 4 / 6).
    Needs no privilege, but no_new_privs (set here). Other readers' files, the worker's
    configuration and catalog, other processes' /proc entries: unreadable."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return "unavailable (kernel without Landlock)"
    handled = _fs_rights(abi)
    attr = struct.pack("=QQQ", handled, _NET_ALL if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    fd = libc.syscall(_LANDLOCK_CREATE, ctypes.c_char_p(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return False
    try:
        read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
        for path in [*SYSTEM_READABLE, *map(str, readable)]:
            _allow(libc, fd, path, read)
        for place in writable:
            _allow(libc, fd, str(place), handled)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return False
        return libc.syscall(_LANDLOCK_RESTRICT, fd, ctypes.c_uint32(0)) == 0
    finally:
        os.close(fd)


def _allow(libc, ruleset: int, path: str, rights: int) -> None:
    try:
        target = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # absent on this machine: nothing to allow
    try:
        is_dir = os.path.isdir(path)
        # rights that only make sense on directories are refused on files
        allowed = rights if is_dir else rights & (_FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE
                                                  | _FS_IOCTL_DEV)
        attr = struct.pack("=Qi", allowed, target)
        libc.syscall(_LANDLOCK_ADD_RULE, ruleset, ctypes.c_uint32(1), ctypes.c_char_p(attr), ctypes.c_uint32(0))
    finally:
        os.close(target)


__all__ = ["install_seccomp", "leave_network", "read_only_except", "restrict_filesystem", "set_limits"]
