"""Facts about the host: the CPU (model name, flags, physical cores; read once), the cores
this process may actually use (affinity and cgroup quota), the thread count asked for, and
the RAM free now.

No torch or numba here: `pixlocal doctor` and the kernels both read it."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    physical_cores: int  # hyperthread siblings counted once; logical CPUs where unknown
    logical_cpus: int


def parse_cpuinfo(text: str) -> CpuInfo:
    """/proc/cpuinfo's text → CpuInfo (flags of the first processor listed)."""
    model, flags, cores = platform.processor() or platform.machine(), frozenset[str](), set()
    phys = ""
    for line in text.splitlines():
        key, _, val = (s.strip() for s in line.partition(":"))
        if key == "model name":
            model = val
        elif key == "flags" and not flags:
            flags = frozenset(val.split())
        elif key == "physical id":
            phys = val
        elif key == "core id":
            cores.add((phys, val))
    logical = os.cpu_count() or 1
    return CpuInfo(model, flags, len(cores) or logical, logical)


@lru_cache(maxsize=1)
def cpu() -> CpuInfo:
    """This machine's CPU (read once)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def cgroup_cpus(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time the cgroup quota allows (cgroup v2 cpu.max, v1 cfs files), None
    where unlimited or unknown. A container limited to 2 CPUs on a 16-core host sees 16 in
    os.cpu_count() yet runs 2 threads' worth: more threads than that only wait."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path(root, "cpu", "cpu.cfs_quota_us").read_text())
        period = int(Path(root, "cpu", "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process can run a thread on at once: the physical cores within its CPU
    affinity and cgroup quota (at least 1)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    allowed = allowed or os.cpu_count() or 1
    n = min(cpu().physical_cores, allowed)
    quota = cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def requested_threads(n: int | None = None) -> int | None:
    """The thread count the user fixed: n, else $PIXLOCAL_THREADS, else None (choose
    automatically). ConfigError for a value that is not a positive integer."""
    if n is not None:
        if n < 1:
            raise ConfigError(f"threads must be a positive integer, not {n}")
        return n
    env = os.environ.get("PIXLOCAL_THREADS", "").strip()
    if not env:
        return None
    if not env.isdigit() or int(env) < 1:
        raise ConfigError(f"PIXLOCAL_THREADS={env!r} is not a positive integer "
                          "(unset it to choose from the free cores)")
    return int(env)


def available_ram() -> int | None:
    """Bytes of RAM the kernel can hand out now (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
