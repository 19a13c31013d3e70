"""What goes into the state machine (events) and what comes out of it (commands).

Both are pydantic unions discriminated by ``kind``, so the server can persist an event log and
the commands it still has to carry out, and the simulator can drive the machine with the exact
same objects. Commands are instructions for the I/O layer (write a device's desired state, record
a decision); the machine itself never performs them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from slmops.protocol.fleet import DeviceActionState
from slmops.server.rollouts.machine.gates import CohortFigure, GateEvaluation
from slmops.server.rollouts.machine.status import RolloutModel, RolloutStatus

# ---------------------------------------------------------------------------- events (inputs)


class MatchedDevice(RolloutModel):
    device_id: str = Field(min_length=1)
    hardware_class: str = Field(min_length=1)
    current_version: str | None = Field(description="what it runs now; null: no model yet")
    unplaceable: str | None = Field(
        None, description="why the target cannot be placed on it; null: it can"
    )
    on_target: bool | None = Field(
        None,
        description="already runs the rollout's release (version and the adapter the release "
        "gives it); null: decide by comparing current_version with the target version",
    )

    def at_target(self, target_version: str) -> bool:
        """Whether the device is on the release already (skipped, never moved)."""
        if self.on_target is not None:
            return self.on_target
        return self.current_version == target_version


class DevicesMatched(RolloutModel):
    """Devices the selector matches: all of them at start, then each late enrollment."""

    kind: Literal["devices-matched"] = "devices-matched"
    devices: list[MatchedDevice]


class DeviceReport(RolloutModel):
    """A device's action state for this rollout, as its agent reported it."""

    kind: Literal["device-report"] = "device-report"
    device_id: str = Field(min_length=1)
    state: DeviceActionState
    failed_stage: DeviceActionState | None = Field(
        None, description="with state=failed: the stage that failed, if the agent knows it"
    )
    detail: str | None = None


class Tick(RolloutModel):
    """Time passed: soak, timeouts and a scheduled start are checked against ``now``."""

    kind: Literal["tick"] = "tick"


class OperatorAction(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"  # stop here; devices already moved keep the target version
    ROLLBACK = "rollback"  # stop and revert every device moved so far


class OperatorCommand(RolloutModel):
    kind: Literal["operator"] = "operator"
    action: OperatorAction
    actor: str = Field(min_length=1)
    reason: str | None = None
    wave: int | None = Field(
        None,
        ge=0,
        description="the wave the operator saw; if the rollout has moved on, the command is "
        "refused, so a repeated or stale promote never skips a second wave",
    )


class MetricSnapshot(RolloutModel):
    """Telemetry aggregates per cohort and hardware class (issue 6); replaces figures by key."""

    kind: Literal["metric-snapshot"] = "metric-snapshot"
    figures: list[CohortFigure]


RolloutEvent = Annotated[
    DevicesMatched | DeviceReport | Tick | OperatorCommand | MetricSnapshot,
    Field(discriminator="kind"),
]
EVENT_ADAPTER: TypeAdapter[RolloutEvent] = TypeAdapter(RolloutEvent)

# --------------------------------------------------------------------------- commands (outputs)


class AssignTarget(RolloutModel):
    """Tell a device to move to the rollout's target version (given once per device)."""

    kind: Literal["assign-target"] = "assign-target"
    device_id: str
    version: str
    wave: int


class RevertDevice(RolloutModel):
    """Tell a device to go back to the version it ran before the rollout (null: no model)."""

    kind: Literal["revert-device"] = "revert-device"
    device_id: str
    to_version: str | None


class WaveStarted(RolloutModel):
    kind: Literal["wave-started"] = "wave-started"
    wave: int
    target: int = Field(description="cumulative devices to have moved by the end of this wave")
    devices: list[str] = Field(description="devices assigned when the wave started")
    reason: str


class DecisionAction(StrEnum):
    ADVANCE = "advance"
    AWAIT_PROMOTE = "await-promote"
    PAUSE = "pause"
    ROLLBACK = "rollback"
    NONE = "none"


class GateDecision(RolloutModel):
    """A wave's verdict changed or caused an action; the evaluation holds the numbers."""

    kind: Literal["gate-decision"] = "gate-decision"
    evaluation: GateEvaluation
    action: DecisionAction


class StateChanged(RolloutModel):
    """The rollout's status changed (also kept in the state's history for the audit trail)."""

    kind: Literal["state-changed"] = "state-changed"
    from_status: RolloutStatus
    to_status: RolloutStatus
    reason: str
    actor: str | None = Field(description="the operator, or null for the machine itself")
    at: float
    wave: int | None = None


RolloutCommand = Annotated[
    AssignTarget | RevertDevice | WaveStarted | GateDecision | StateChanged,
    Field(discriminator="kind"),
]
COMMAND_ADAPTER: TypeAdapter[RolloutCommand] = TypeAdapter(RolloutCommand)
