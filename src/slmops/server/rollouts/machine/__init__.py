"""Rollouts as a pure, persisted state machine: waves, gates, decisions. No I/O here.

A rollout moves the devices a selector matches to a target version in waves (default 1%, at
least one device, then 10%, 50%, 100%). Each wave must pass its gates (devices reported, install
success rate, health-check failures, soak time, and telemetry metrics against the baseline cohort
once they exist) before the next starts; a failing wave pauses or rolls back the rollout by
itself, and operators can start, pause, resume, promote, abort or roll back.

States::

    created ──── start ─────────┐
                                ▼
    scheduled ── start_at, ──► running ─── last wave passes, or is promoted ───► succeeded
                 or start     (wave i)
                               │  ▲  ↺ wave i passes (auto_advance) or is promoted: wave i+1
      pause; or a gate failure │  │
      or timeout whose action  │  │ resume; or promote (resumes and advances)
      is pause                 ▼  │
                              paused
                               │
                               │ rollback   ┌─ from running: rollback; or a gate failure
                               ▼            ▼  or timeout whose action is rollback
                              rolling-back ── every reverted device reports it ──► rolled-back

    created, scheduled, running, paused, rolling-back ── abort ──► aborted

Abort stops assigning and leaves the devices already moved on the target version; rollback
reverts every moved device to the version it had before. A wave that would add no device
(1% and 10% of 7 devices are both 1 device) is skipped, never soaked. Every matched device is
accounted for: moved, queued, skipped (already on the target) or unplaceable (with its reason);
a start with nothing to move succeeds when all are already there, and pauses, saying what it
counted, when some cannot be placed.

``succeeded``, ``rolled-back`` and ``aborted`` are terminal: nothing moves a rollout out of them
and no device is assigned or reverted once there. Device reports are still recorded, so the
per-device view stays true.

Modules: ``policy`` (what the user configures), ``plan`` (wave sizes, device order), ``gates``
(facts in, results with numbers out), ``events`` (inputs and commands), ``state`` (the persisted
records and their tally), ``machine`` (``step``), ``waves`` (the mechanics ``step`` uses),
``errors``.
"""

from slmops.server.rollouts.machine.errors import InvalidTransition, NeedDevices
from slmops.server.rollouts.machine.events import (
    COMMAND_ADAPTER,
    EVENT_ADAPTER,
    AssignTarget,
    DecisionAction,
    DeviceReport,
    DevicesMatched,
    GateDecision,
    MatchedDevice,
    MetricSnapshot,
    OperatorAction,
    OperatorCommand,
    RevertDevice,
    RolloutCommand,
    RolloutEvent,
    StateChanged,
    Tick,
    WaveStarted,
)
from slmops.server.rollouts.machine.gates import (
    Cohort,
    CohortFigure,
    Gate,
    GateEvaluation,
    GateResult,
    GateStatus,
    Verdict,
    WaveFacts,
    evaluate,
    gate_list,
)
from slmops.server.rollouts.machine.machine import ALLOWED, step
from slmops.server.rollouts.machine.plan import pick_order, wave_targets
from slmops.server.rollouts.machine.policy import (
    FailureAction,
    GateOverrides,
    MetricGate,
    RolloutPolicy,
    WaveGates,
    WaveStep,
)
from slmops.server.rollouts.machine.state import (
    DeviceRecord,
    RolloutState,
    Tally,
    WaveOutcome,
    WaveRecord,
    WaveTally,
    create_rollout,
)
from slmops.server.rollouts.machine.status import RolloutStatus

__all__ = [
    "ALLOWED",
    "COMMAND_ADAPTER",
    "EVENT_ADAPTER",
    "AssignTarget",
    "Cohort",
    "CohortFigure",
    "DecisionAction",
    "DeviceRecord",
    "DeviceReport",
    "DevicesMatched",
    "FailureAction",
    "Gate",
    "GateDecision",
    "GateEvaluation",
    "GateOverrides",
    "GateResult",
    "GateStatus",
    "InvalidTransition",
    "MatchedDevice",
    "MetricGate",
    "MetricSnapshot",
    "NeedDevices",
    "OperatorAction",
    "OperatorCommand",
    "RevertDevice",
    "RolloutCommand",
    "RolloutEvent",
    "RolloutPolicy",
    "RolloutState",
    "RolloutStatus",
    "StateChanged",
    "Tally",
    "Tick",
    "Verdict",
    "WaveFacts",
    "WaveGates",
    "WaveOutcome",
    "WaveRecord",
    "WaveStarted",
    "WaveStep",
    "WaveTally",
    "create_rollout",
    "evaluate",
    "gate_list",
    "pick_order",
    "step",
    "wave_targets",
]
