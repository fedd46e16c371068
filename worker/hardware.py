"""What this machine can serve: CPU features, memory, GPUs, and so which queues it may consume."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class HardwareInfo:
    machine: str
    cpu_count: int
    cpu_flags: tuple[str, ...]
    memory_bytes: int
    gpus: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        data = asdict(self)
        # The full flag list is long; the ones that decide kernel speed are enough.
        data["cpu_flags"] = [f for f in self.cpu_flags if f in _INTERESTING_FLAGS]
        return data


_INTERESTING_FLAGS = {"avx", "avx2", "avx512f", "avx512bw", "avx512_vnni", "fma", "f16c", "neon", "sve"}


def _cpu_flags() -> tuple[str, ...]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return ()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            return tuple(sorted(set(line.split(":", 1)[1].split())))
    return ()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _gpus() -> tuple[str, ...]:
    # /proc/driver/nvidia lists the GPUs the kernel driver sees, without importing torch.
    gpu_dir = Path("/proc/driver/nvidia/gpus")
    if gpu_dir.is_dir():
        return tuple(sorted(p.name for p in gpu_dir.iterdir()))
    if shutil.which("nvidia-smi") and Path("/dev/nvidia0").exists():
        return ("nvidia0",)
    return ()


def detect() -> HardwareInfo:
    return HardwareInfo(
        machine=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        cpu_flags=_cpu_flags(),
        memory_bytes=_memory_bytes(),
        gpus=_gpus(),
    )


def can_serve(info: HardwareInfo, hardware_class: str) -> tuple[bool, str]:
    """Whether a worker on this hardware may consume the given class's queue, and why not."""
    if hardware_class == "cpu":
        return True, ""
    if hardware_class == "cuda":
        if info.gpus:
            return True, ""
        return False, "hardware class 'cuda' needs an NVIDIA GPU and none was found"
    return False, f"unknown hardware class {hardware_class!r}"
