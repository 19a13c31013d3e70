"""CPU training plumbing shared by the distill pass and `slmops adapt`: threads and budgets.

Both train on CPU next to other work, so they size torch's thread pool from what this process
may really use (the affinity mask that taskset and cgroup cpusets set, and a cgroup v2 `cpu.max`
quota), not from os.cpu_count(), which counts every core of the host and oversubscribes a
container. Both stop on a step count or a wall-clock budget, whichever comes first, so a run on
a slow box ends when the user said it would.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


def usable_cpus() -> int:
    """CPUs this process may run on: affinity mask, capped by a cgroup v2 cpu.max quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_torch_threads(requested: int | None = None) -> int:
    """Size torch's pool. On a box shared with other busy processes fewer threads can be much
    faster (OpenMP workers spin waiting for each other), hence the explicit override."""
    import torch

    n = requested or usable_cpus()
    torch.set_num_threads(n)
    return n


@dataclass
class Budget:
    """Stop after `steps` optimizer steps or `minutes` of wall time, whichever comes first."""

    steps: int | None
    minutes: float | None
    started: float = field(default_factory=time.perf_counter)
    done: int = 0

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("a budget needs steps or minutes")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def exhausted(self) -> bool:
        if self.steps is not None and self.done >= self.steps:
            return True
        return self.minutes is not None and self.elapsed >= self.minutes * 60

    def stopped_by(self) -> str:
        return "steps" if self.steps is not None and self.done >= self.steps else "minutes"

    def fraction(self) -> float:
        """Progress in [0, 1] by whichever limit is closer, for progress bars."""
        parts = []
        if self.steps:
            parts.append(self.done / self.steps)
        if self.minutes:
            parts.append(self.elapsed / (self.minutes * 60))
        return min(1.0, max(parts, default=0.0))
