"""The persisted rollout: one pydantic document holding everything the machine needs.

The whole state round-trips through JSON exactly, so the server stores it in one column and a
restart resumes the rollout from the last stored document with no other memory. It records each
device's version before the rollout (what a rollback reverts it to), which wave moved it, and what
it last reported; each wave's timings, latest gate evaluation and deciding evaluation; and the
history of status changes with who made them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from slmops.protocol.fleet import DeviceActionState
from slmops.server.rollout.events import StateChanged
from slmops.server.rollout.gates import GateEvaluation, ReceivedFigure
from slmops.server.rollout.plan import wave_targets
from slmops.server.rollout.policy import RolloutPolicy
from slmops.server.rollout.status import RolloutModel, RolloutStatus

STATE_SCHEMA: Literal["slmops.rollout-state/v1"] = "slmops.rollout-state/v1"


class DeviceRecord(RolloutModel):
    """One matched device, from the rollout's point of view."""

    hardware_class: str
    from_version: str | None = Field(description="version before the rollout: the revert target")
    skipped: bool = Field(False, description="already on the target when matched: never moved")
    wave: int | None = Field(None, description="the wave that assigned it; null: still queued")
    assigned_at: float | None = None
    reverted_at: float | None = Field(None, description="when it was told to revert")
    state: DeviceActionState | None = Field(None, description="last reported action state")
    failed_stage: DeviceActionState | None = None
    detail: str | None = None
    reported_at: float | None = None

    @property
    def status(self) -> str:
        """One word for tables: skipped, queued, or the last reported (or assumed) state."""
        if self.skipped:
            return "skipped"
        if self.wave is None:
            return "queued"
        return (self.state or DeviceActionState.SCHEDULED).value

    @property
    def health_failed(self) -> bool:
        """Failed its health check: reported so, or rolled itself back without being told to."""
        if self.state is DeviceActionState.FAILED:
            return self.failed_stage is DeviceActionState.HEALTH_CHECKING
        return self.state is DeviceActionState.ROLLED_BACK and self.reverted_at is None


class WaveOutcome(StrEnum):
    PASSED = "passed"
    PROMOTED = "promoted"
    SKIPPED = "skipped"  # no new devices: earlier waves already reached its target
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    ROLLED_BACK = "rolled-back"  # an operator rolled back during this wave
    ABORTED = "aborted"


class WaveRecord(RolloutModel):
    index: int
    started_at: float
    timer_from: float = Field(description="timeouts count from here: the start or last resume")
    ended_at: float | None = None
    outcome: WaveOutcome | None = None
    ended_by: str | None = Field(None, description="the operator who promoted or stopped it")
    evaluation: GateEvaluation | None = Field(None, description="latest gate evaluation")
    decision: GateEvaluation | None = Field(None, description="the evaluation that acted last")


class RolloutState(RolloutModel):
    schema_: Literal["slmops.rollout-state/v1"] = Field(STATE_SCHEMA, alias="schema")
    rollout_id: str = Field(min_length=1)
    target_version: str = Field(min_length=1)
    seed: str = Field(description="orders devices into waves; fixed at creation")
    policy: RolloutPolicy
    status: RolloutStatus
    created_at: float
    start_at: float | None = None
    wave: int | None = Field(None, description="current wave index; null before the start")
    waves: list[WaveRecord] = Field(default_factory=list)
    devices: dict[str, DeviceRecord] = Field(default_factory=dict)
    figures: list[ReceivedFigure] = Field(default_factory=list)
    history: list[StateChanged] = Field(default_factory=list)
    model_config = RolloutModel.model_config | {"populate_by_name": True}

    @property
    def total(self) -> int:
        """Devices the rollout moves: matched and not already on the target version."""
        return sum(1 for d in self.devices.values() if not d.skipped)

    @property
    def assigned(self) -> list[str]:
        return [i for i, d in self.devices.items() if d.wave is not None]

    def targets(self) -> list[int]:
        """Cumulative device targets of every wave for the devices matched so far."""
        return wave_targets(self.policy.waves, self.total)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RolloutState:
        return cls.model_validate_json(text)


def create_rollout(
    rollout_id: str,
    target_version: str,
    *,
    now: float,
    policy: RolloutPolicy | None = None,
    seed: str | None = None,
    start_at: float | None = None,
) -> RolloutState:
    """A new rollout: ``created`` (waits for a start command) or ``scheduled`` at ``start_at``.

    The seed defaults to the rollout id, so the same rollout always picks the same canaries.
    """
    return RolloutState(
        rollout_id=rollout_id,
        target_version=target_version,
        seed=rollout_id if seed is None else seed,
        policy=policy or RolloutPolicy(),
        status=RolloutStatus.CREATED if start_at is None else RolloutStatus.SCHEDULED,
        created_at=now,
        start_at=start_at,
    )
