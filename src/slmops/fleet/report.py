"""What a simulated fleet saw, counted as it happens and summed up as one JSON document.

Latencies are kept per call kind (check-in, enroll, actions, telemetry) as raw samples so the
percentiles are exact; ``lag`` is how late the simulator started a due check-in, so a run whose
simulator fell behind says so instead of reporting its own queueing as the server's latency.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of ``values`` by nearest rank, in the values' unit; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


@dataclass
class Stats:
    """Counters the engine updates; ``summary()`` turns them into the report."""

    latency: dict[str, list[float]] = field(default_factory=dict)
    status: dict[str, Counter[int]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    lag: list[float] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    told: dict[str, set[str]] = field(default_factory=dict)
    enroll_seconds: float = 0.0
    run_seconds: float = 0.0
    converged_at: float | None = None

    def call(self, kind: str, seconds: float, status: int) -> None:
        self.latency.setdefault(kind, []).append(seconds)
        self.status.setdefault(kind, Counter())[status] += 1
        if status >= 400:
            self.errors[f"{kind}:http_{status}"] += 1

    def failure(self, kind: str, what: str) -> None:
        self.errors[f"{kind}:{what}"] += 1

    def calls(self, kind: str) -> int:
        return sum(self.status.get(kind, Counter()).values())

    def since(self, kind: str, start: int) -> list[float]:
        return self.latency.get(kind, [])[start:]

    def summary(self) -> dict[str, Any]:
        checkin = self.latency.get("checkin", [])
        codes = self.status.get("checkin", Counter())
        n = len(checkin)
        run = self.run_seconds or 1e-9
        multiple = sorted(d for d, versions in self.told.items() if len(versions) > 1)
        out: dict[str, Any] = {
            "enroll_seconds": round(self.enroll_seconds, 2),
            "enroll_per_s": (
                round(self.calls("enroll") / self.enroll_seconds, 1)
                if self.enroll_seconds
                else None
            ),
            "run_seconds": round(self.run_seconds, 2),
            "checkins": n,
            "checkins_per_s": round(n / run, 1),
            "checkin_p50_ms": _ms(percentile(checkin, 0.5)),
            "checkin_p99_ms": _ms(percentile(checkin, 0.99)),
            "checkin_max_ms": _ms(max(checkin) if checkin else None),
            "ratio_304": round(codes.get(304, 0) / n, 4) if n else None,
            "status": {
                k: {str(c): v for c, v in sorted(s.items())} for k, s in self.status.items()
            },
            "latency_ms": {
                k: {"p50": _ms(percentile(v, 0.5)), "p99": _ms(percentile(v, 0.99))}
                for k, v in self.latency.items()
            },
            "errors": dict(sorted(self.errors.items())),
            "error_count": sum(self.errors.values()),
            "schedule_lag_p99_ms": _ms(percentile(self.lag, 0.99)),
            "events": dict(sorted(self.events.items())),
            "devices_told_multiple_targets": len(multiple),
            "devices_told_multiple_targets_sample": multiple[:10],
            "time_to_converge_s": (
                None if self.converged_at is None else round(self.converged_at, 2)
            ),
            "versions_over_time": self.timeline,
        }
        return out
