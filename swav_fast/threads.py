"""How many torch intra-op CPU threads a run uses (``train.threads``; 0 = chosen here).

torch's default is one thread per core the machine has, which oversubscribes the CPU when the
process may use fewer cores (a CPU affinity mask, a container's cgroup quota) or when loader worker
processes decode images on the same cores: every step then waits on descheduled threads (measured on
a busy 2-core machine: 22 images/s with the default, 112 with one thread; ``swav-fast bench threads``).

Rule (:func:`choose_threads`): usable cores = min(CPUs in the affinity mask, floor of the cgroup CPU
quota, at least 1), shared by the training processes of this node (torchrun's ``LOCAL_WORLD_SIZE``)
unless the launcher already pinned each one to its own cores; threads = usable cores - loader
workers, at least 1. ``train.threads=N`` (N > 0)
overrides it, and so does an ``OMP_NUM_THREADS`` set in the environment (torch's own setting).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cpus() -> int | None:
    """CPUs this process may run on (``os.sched_getaffinity``), or None where unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup CPU limit in cores: v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 = none); None when there is no limit."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            quota_us = int((root / sub / "cpu.cfs_quota_us").read_text())
            period_us = int((root / sub / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


@dataclass
class ThreadChoice:
    threads: int
    usable_cpus: int
    affinity: int | None
    quota: float | None
    loader_workers: int
    requested: int  # train.threads (0 = auto)
    env: int | None = None  # OMP_NUM_THREADS, when set

    def describe(self) -> str:
        if self.requested:
            return f"{self.threads} (train.threads={self.requested}; {self.usable_cpus} usable core(s))"
        if self.env:
            return (f"{self.threads} (OMP_NUM_THREADS={self.env}; {self.usable_cpus} usable core(s); "
                    "train.threads=N overrides it)")
        quota = "none" if self.quota is None else f"{self.quota:g}"
        return (f"{self.threads} (auto: {self.usable_cpus} usable core(s) [affinity {self.affinity}, cgroup "
                f"quota {quota}] - {self.loader_workers} loader worker(s); override with train.threads=N)")


def usable_cpus(affinity: int | None, quota: float | None, cpu_count: int | None = None) -> int:
    """Cores this process can keep busy: the affinity mask, capped by the floor of the cgroup quota."""
    cores = affinity or cpu_count or 1
    if quota is not None and quota > 0:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def choose_threads(affinity: int | None, quota: float | None, loader_workers: int, requested: int = 0,
                   cpu_count: int | None = None, env: int | None = None,
                   local_processes: int = 1) -> ThreadChoice:
    """The rule of the module docstring (a pure function: the inputs are passed in)."""
    cpus = usable_cpus(affinity, quota, cpu_count)
    if local_processes > 1 and (affinity is None or affinity == cpu_count):  # not pinned per process
        cpus = max(1, cpus // local_processes)
    auto = env if env and env > 0 else max(1, cpus - max(0, loader_workers))
    threads = requested if requested > 0 else auto
    return ThreadChoice(threads, cpus, affinity, quota, max(0, loader_workers), requested,
                        env if env and env > 0 else None)


def omp_num_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive number, or None (unset or not a number)."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def machine_threads(requested: int, loader_workers: int) -> ThreadChoice:
    """:func:`choose_threads` with this machine's affinity, cgroup quota, core count and environment."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return choose_threads(affinity_cpus(), cgroup_cpu_quota(), loader_workers, requested, os.cpu_count(),
                          omp_num_threads(), int(local) if local.isdigit() else 1)


def set_cpu_threads(requested: int, loader_workers: int) -> ThreadChoice:
    """Choose the thread count for this machine and apply it with ``torch.set_num_threads``."""
    import torch

    choice = machine_threads(requested, loader_workers)
    torch.set_num_threads(choice.threads)
    return choice
