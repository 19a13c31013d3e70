"""The perf watchdog samples slowly once memory settles, yet still enforces the ceiling.

Plain Python children that allocate on a schedule, no model: what is under test is the parent's
sampling (perf._watch), which slows to SETTLED_INTERVAL_S during a flat stretch so that it does
not keep waking up on the CPUs a measurement is pinned to.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from slmops.evaluate import perf

MIB = 1024 * 1024

GROW_LATE = """
import sys, time
keep = [bytearray(8 * 2**20)]
time.sleep(float(sys.argv[1]))  # flat: the watchdog has slowed down by now
keep.append(bytearray(200 * 2**20))
for i in range(0, len(keep[1]), 4096):
    keep[1][i] = 1  # touch every page: RSS, not just address space
time.sleep(30)
"""


def _child(seconds_flat: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", GROW_LATE, str(seconds_flat)])


def test_growth_after_a_settled_stretch_is_still_killed() -> None:
    child = _child(1.5)
    t0 = time.perf_counter()
    peak, exceeded, late = perf._watch(child, 120 * MIB, t0 + 60)
    assert exceeded and not late
    assert child.returncode is not None and child.returncode < 0  # killed, not exited
    assert peak > 120 * MIB
    assert time.perf_counter() - t0 < 10, "killed within a few slow samples, not at the timeout"


def test_a_flat_child_is_sampled_slowly(monkeypatch: pytest.MonkeyPatch) -> None:
    samples: list[float] = []
    real = perf._rss

    def counting(procs: list[object]) -> int:
        samples.append(time.perf_counter())
        return real(procs)

    monkeypatch.setattr(perf, "_rss", counting)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    perf._watch(child, 1024 * MIB, time.perf_counter() + 60)
    # 3 s at a constant 15 ms would be ~200 samples; settled, the last second has ~4
    last_second = [t for t in samples if t > samples[-1] - 1.0]
    assert len(samples) < 60 and len(last_second) <= 6, (len(samples), len(last_second))
