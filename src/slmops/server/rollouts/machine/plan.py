"""Wave sizes and the order in which devices are picked: deterministic, from a stored seed.

Two restarts of the server, or the simulator and the real server, must pick the same devices for
the same rollout, so nothing here uses randomness or clocks: the order is the SHA-256 of the
rollout's seed and the device id. The order also interleaves hardware classes (the best-ranked
device of each class first, then the second of each, ...), so even a small canary wave covers
several classes and each class gets a canary cohort to compare with its baseline cohort.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

from slmops.server.rollouts.machine.policy import WaveStep


def wave_targets(waves: Sequence[WaveStep], total: int) -> list[int]:
    """Cumulative number of devices moved by the end of each wave, for ``total`` devices.

    Percentages round up (1% of 7 devices is 1 device, never 0) and use exact decimal arithmetic,
    so 10% of 100 is 10, not 11 from a float just above 10. A count is capped at ``total``. Targets
    never decrease: a count smaller than an earlier percentage's share adds nothing to its wave.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    targets: list[int] = []
    previous = 0
    for step in waves:
        if step.count is not None:
            target = min(step.count, total)
        else:
            percent = Fraction(repr(step.percent))
            target = min(total, math.ceil(percent * total / 100))
        previous = max(previous, target)
        targets.append(previous)
    return targets


def device_rank(seed: str, key: str) -> str:
    """The sort key of one device (or hardware class) in a rollout seeded with ``seed``."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def pick_order(seed: str, candidates: Mapping[str, str]) -> list[str]:
    """Order devices (id -> hardware class) in which they join waves.

    Within a class, devices go by rank; across classes, the n-th device of every class comes
    before the (n+1)-th of any, classes ordered by their own rank.
    """
    by_class: dict[str, list[str]] = {}
    for device_id, hardware_class in candidates.items():
        by_class.setdefault(hardware_class, []).append(device_id)
    keyed: list[tuple[int, str, str, str]] = []
    for hardware_class, ids in by_class.items():
        class_rank = device_rank(seed, "class:" + hardware_class)
        ranked = sorted(ids, key=lambda d: (device_rank(seed, d), d))
        keyed.extend((n, class_rank, hardware_class, d) for n, d in enumerate(ranked))
    keyed.sort()
    return [device_id for *_, device_id in keyed]
