"""How many CPU threads torch uses.

torch's OpenMP threads wait for each other at the end of every parallel region, spinning while they
wait. When another busy process holds one of the cores, the thread that shares that core is descheduled
for a whole time slice while its partner spins, at every one of the thousands of small parallel regions
of a training step: on 2 cores with another torch job running, `rho1 train` (nano) took 55 s with
2 threads and 1.4 s with 1 (benchmarks/threads.py). So by default rho1 uses only the cores that are
idle when it starts (measured over 0.2 s from /proc/stat), and all of them on an idle machine, where
2 threads are 1.7x faster than 1 for the demo's model. ``--threads N`` (or OMP_NUM_THREADS, which
torchrun and accelerate launch set per process) decides instead.
"""

from __future__ import annotations

import os
import time


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over ``cpus``, from /proc/stat (Linux); None elsewhere."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    idle = total = 0.0
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [float(x) for x in values[:8]]
            idle += v[3] + v[4]  # idle + iowait
            total += sum(v)
    return (idle, total) if total else None


def idle_cores(window: float = 0.2) -> int | None:
    """How many of this process's cores were idle over ``window`` seconds (rounded, at least 1)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    if before is None:
        return None
    time.sleep(window)
    after = _cpu_times(cpus)
    if after is None or after[1] <= before[1]:
        return None
    idle_share = (after[0] - before[0]) / (after[1] - before[1])
    return max(1, min(len(cpus), round(idle_share * len(cpus))))


def default_threads() -> int | None:
    """The thread count rho1 picks when neither --threads nor OMP_NUM_THREADS says (None: torch's own)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return idle_cores()


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads in torch (default: ``default_threads()``); returns the count in use."""
    import torch

    threads = threads or default_threads()
    if threads and threads != torch.get_num_threads():  # an explicit call changes some kernels' summation order
        torch.set_num_threads(threads)
    return torch.get_num_threads()
