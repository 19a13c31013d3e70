"""When the agent polls and retries: jittered polls and exponential backoff with full jitter, so
a fleet's devices spread their requests instead of arriving together."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def jittered(seconds: float, rng: random.Random, fraction: float = 0.1) -> float:
    """`seconds` +- `fraction`, uniformly: spreads a fleet's polls over time."""
    return seconds * rng.uniform(1.0 - fraction, 1.0 + fraction)


@dataclass
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog): the n-th consecutive
    failure waits uniform(0, min(cap, base * 2**(n-1))), so devices that lost the server
    together do not come back together."""

    base: float = 1.0
    cap: float = 300.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def ceiling(self) -> float:
        return min(self.cap, self.base * 2.0 ** max(0, self.failures - 1))

    def next_delay(self) -> float:
        self.failures += 1
        return self.rng.uniform(0.0, self.ceiling())

    def reset(self) -> None:
        self.failures = 0
