"""The simulator's settings: one dataclass, checked before anything starts.

Intervals and latencies are in simulated seconds; ``accelerate`` divides them all, so a run
with K=60 treats a 60 s poll and a 20 s download as 1 s and a third of a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slmops.core.errors import UserInputError
from slmops.protocol.fleet import DeviceActionState as S


@dataclass
class SimConfig:
    """Everything a run needs; ``check()`` refuses nonsense with the option to fix."""

    servers: list[str]
    enroll_token: str
    devices: int = 100
    poll: float = 60.0
    duration: float = 60.0
    accelerate: float = 1.0
    failure_rate: float = 0.0
    fail_versions: dict[str, float] = field(default_factory=dict)
    offline_rate: float = 0.0
    offline_polls: tuple[float, float] = (2.0, 6.0)
    concurrency: int = 64
    latencies: dict[str, float] = field(
        default_factory=lambda: {
            S.DOWNLOADING.value: 20.0,
            S.VERIFYING.value: 2.0,
            S.INSTALLING.value: 5.0,
            S.HEALTH_CHECKING.value: 3.0,
        }
    )
    telemetry: bool = True
    telemetry_seconds: float | None = None  # None: the window of the server's telemetry policy
    jitter: float = 0.1
    prefix: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    converge_version: str | None = None
    until_converged: bool = False
    fetch: bool = False
    timeout: float = 10.0
    sample_seconds: float = 1.0

    def check(self) -> None:
        def bad(option: str, why: str) -> UserInputError:
            return UserInputError(why, where=option, hint="see slmops fleet simulate --help")

        if not self.servers:
            raise bad("--server", "no server URL given (or use --canned)")
        if self.devices < 1:
            raise bad("--devices", f"need at least one device, got {self.devices}")
        if self.poll <= 0 or self.duration <= 0 or self.accelerate <= 0:
            raise bad("--poll/--duration/--accelerate", "must be positive")
        for name, rate in [
            ("--failure-rate", self.failure_rate),
            ("--offline-rate", self.offline_rate),
            *((f"--fail-version {v}", r) for v, r in self.fail_versions.items()),
        ]:
            if not 0.0 <= rate <= 1.0:
                raise bad(name, f"a probability between 0 and 1, got {rate}")
        if self.concurrency < 1:
            raise bad("--concurrency", f"need at least one connection, got {self.concurrency}")
        if len(self.enroll_token) < 8:
            raise bad("--enroll-token", "too short to be an enrollment token")

    def scaled(self, seconds: float) -> float:
        return seconds / self.accelerate
