"""How many intra-op threads torch uses: the cores this process may run on, shared among the ranks of this node.

torch's default is the machine's core count, whatever the process is allowed: in a container with a CPU quota,
under `taskset`, or with two DDP ranks on one machine it oversubscribes the cores, and each step pays for
threads that wait on each other (issue 14 measured 60 tiny steps in 536 s with the default against 26 s with one
thread, on a 2-core machine with one other busy process). The cores allowed are the smaller of the CPU affinity
mask and the cgroup quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), rounded up; `threads=N` sets the number
outright, and an OMP_NUM_THREADS given by the user is respected.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The cgroup's CPU quota in cores (e.g. 1.5), or None when there is none."""
    try:  # cgroup v2
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cores(root: Path = CGROUP) -> tuple[int, str]:
    """(cores, how they were counted)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(root)
    cores = affinity if quota is None else max(1, min(affinity, math.ceil(quota)))
    return cores, f"affinity {affinity}, cgroup quota {'none' if quota is None else f'{quota:g}'}"


def ranks_on_this_node(trainer_cfg: Any) -> int:
    """Processes of this run on this machine: LOCAL_WORLD_SIZE when a launcher (torchrun, SLURM) set it, else the
    trainer's devices under a DDP strategy (Lightning starts one process per device)."""
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env and env.isdigit():
        return max(1, int(env))
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) and not isinstance(devices, bool):
        return max(1, devices)
    if isinstance(devices, str) and devices.isdigit():
        return max(1, int(devices))
    try:  # a list of device indices
        return max(1, len(list(devices)))
    except TypeError:
        return 1  # "auto", -1: Lightning decides; count one


def configure_threads(requested: int | None, ranks: int = 1) -> tuple[int, str]:
    """Set torch's intra-op threads; (threads, the reason, for the run's log)."""
    import torch

    if requested is not None:
        n, why = int(requested), "threads=" + str(requested)
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        cores, how = usable_cores()
        n = max(1, cores // max(1, ranks))
        why = f"{cores} usable cores ({how}) / {ranks} rank{'s' if ranks != 1 else ''} on this machine"
    torch.set_num_threads(n)
    return n, why
