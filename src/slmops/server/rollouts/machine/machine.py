"""The transition function: ``step(state, event, now) -> (new_state, commands)``.

Pure: it copies the state, applies one event at the injected time ``now`` and returns the new
state with the commands the I/O layer must carry out. It never reads a clock, draws a random
number or touches a file or socket, so the same (state, event, now) always gives the same result:
after a restart the server loads the last stored state and carries on, and the simulator can
drive thousands of rollouts with an accelerated clock.

Replaying an event is harmless: a repeated device match or report changes nothing and assigns
nobody; a repeated operator command is refused (``InvalidTransition``) when the state no longer
allows it, and an operator command naming a ``wave`` is refused once the rollout has moved past
that wave. When ``step`` raises, the caller's state is untouched.

Order inside one step: apply the event; start a scheduled rollout whose ``start_at`` has come;
then, while running, evaluate the current wave's gates and act on the verdict.
"""

from __future__ import annotations

import math

from slmops.protocol.fleet import DeviceActionState
from slmops.server.rollouts.machine.errors import InvalidTransition
from slmops.server.rollouts.machine.events import (
    DeviceReport,
    DevicesMatched,
    MetricSnapshot,
    OperatorAction,
    OperatorCommand,
    RolloutCommand,
    RolloutEvent,
    Tick,
)
from slmops.server.rollouts.machine.gates import ReceivedFigure
from slmops.server.rollouts.machine.state import DeviceRecord, RolloutState, WaveOutcome
from slmops.server.rollouts.machine.status import RolloutStatus
from slmops.server.rollouts.machine.waves import NOTHING_CAN_MOVE, Run, fork

S = RolloutStatus
ALLOWED: dict[OperatorAction, frozenset[RolloutStatus]] = {
    OperatorAction.START: frozenset({S.CREATED, S.SCHEDULED}),
    OperatorAction.PAUSE: frozenset({S.RUNNING}),
    OperatorAction.RESUME: frozenset({S.PAUSED}),
    OperatorAction.PROMOTE: frozenset({S.RUNNING, S.PAUSED}),
    OperatorAction.ROLLBACK: frozenset({S.RUNNING, S.PAUSED}),
    OperatorAction.ABORT: frozenset(s for s in S if not s.is_terminal),
}
"""Which operator command each status accepts; anything else raises ``InvalidTransition``."""


def step(
    state: RolloutState, event: RolloutEvent, now: float
) -> tuple[RolloutState, list[RolloutCommand]]:
    """Apply ``event`` at time ``now`` (seconds, any fixed epoch) to a copy of ``state``."""
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, got {now!r}")
    run = Run(fork(state), now)
    match event:
        case DevicesMatched():
            _matched(run, event)
        case DeviceReport():
            _reported(run, event)
        case OperatorCommand():
            _operator(run, event)
        case MetricSnapshot():
            _metrics(run, event)
        case Tick():
            pass
    s = run.state
    if s.status is S.SCHEDULED and s.start_at is not None and now >= s.start_at:
        run.start(f"scheduled start at {s.start_at:g}", None)
    if s.status is S.RUNNING:
        run.drive()
    run.tally()  # fold the last record changes into the counts before the state leaves
    return s, run.commands


def _matched(run: Run, event: DevicesMatched) -> None:
    """Record devices; while running, the current wave takes its share of the new ones.

    The first placeable sighting decides whether a device is skipped (already on the target).
    A device the target cannot be placed on is recorded as unplaceable with the reason, so every
    matched device is accounted for; a later sighting where it fits makes it queued (or
    skipped). A queued device's class and version follow later sightings (it has not been
    touched yet); an assigned device keeps the version it had before the rollout, which is what
    a rollback restores. After the rollout ended, matches are ignored: the blueprint's desired
    state governs them.
    """
    s = run.state
    if s.status.is_terminal:
        return
    for m in event.devices:
        known = s.devices.get(m.device_id)
        if known is None:
            record = DeviceRecord(
                hardware_class=m.hardware_class,
                from_version=m.current_version,
                skipped=m.unplaceable is None and m.at_target(s.target_version),
                unplaceable=m.unplaceable,
            )
            run.add(m.device_id, record)
            continue
        if known.skipped or known.wave is not None:
            continue
        seen = (m.hardware_class, m.current_version, m.unplaceable)
        if (known.hardware_class, known.from_version, known.unplaceable) == seen:
            continue
        d = run.edit(m.device_id)
        if known.unplaceable is not None and m.unplaceable is None:  # placeable at last
            d.skipped = m.at_target(s.target_version)
        d.hardware_class, d.from_version, d.unplaceable = seen
    last = s.history[-1] if s.history else None
    waiting = (
        s.status is S.PAUSED
        and s.wave is None
        and last is not None
        and last.actor is None
        and last.reason.startswith(NOTHING_CAN_MOVE)
    )
    if waiting and run.tally().total > 0:  # paused by itself for want of a placeable device
        run.start("devices became placeable (e.g. a missing adapter or version arrived)", None)
        return
    run.fill()


def _reported(run: Run, event: DeviceReport) -> None:
    """Record a device's action state; reports from devices this rollout never moved are dropped.

    A failure without a stage takes the stage the device last reported (failing right after
    ``health-checking`` is a health-check failure). Reports are recorded in every status, also
    terminal ones, so the per-device view stays true after the rollout ends.
    """
    d = run.state.devices.get(event.device_id)
    if d is None or d.wave is None:
        return
    if d.reverted_at is not None and d.state is DeviceActionState.ROLLED_BACK:
        return  # its revert is done and counted; a later step (an adapter) must not undo that
    stage: DeviceActionState | None = None
    detail = event.detail
    if event.state is DeviceActionState.FAILED:
        if event.failed_stage is not None:
            stage = event.failed_stage
        elif d.state is DeviceActionState.FAILED:
            stage = d.failed_stage
        elif d.state is not None and not d.state.is_final:
            stage = d.state
    elif event.state is DeviceActionState.ROLLED_BACK:
        if d.state is DeviceActionState.ROLLED_BACK:
            return  # a repeated revert report: keep what the first one recorded
        if d.state is DeviceActionState.FAILED:  # keep why it failed beside how it came back
            stage = d.failed_stage
            detail = f"{event.detail or 'rolled back'} (after failing: {d.detail or '-'})"
    if (d.state, d.failed_stage, d.detail) != (event.state, stage, detail):
        d = run.edit(event.device_id)
        d.state, d.failed_stage, d.detail = event.state, stage, detail
        d.reported_at = run.now
    run.finish_rollback_if_done()


def _metrics(run: Run, event: MetricSnapshot) -> None:
    s = run.state
    if s.status.is_terminal:
        return
    fresh = [ReceivedFigure(**f.model_dump(), received_at=run.now) for f in event.figures]
    keys = {(f.hardware_class, f.cohort, f.metric) for f in fresh}
    kept = [f for f in s.figures if (f.hardware_class, f.cohort, f.metric) not in keys]
    s.figures = kept + fresh


def _operator(run: Run, cmd: OperatorCommand) -> None:
    s = run.state
    allowed = ALLOWED[cmd.action]
    if s.status not in allowed:
        raise InvalidTransition(
            cmd.action.value, s.status.value, rollout_id=s.rollout_id, allowed=allowed
        )
    if cmd.wave is not None and cmd.wave != s.wave:
        at = "has not started" if s.wave is None else f"is at wave {s.wave}"
        raise InvalidTransition(
            cmd.action.value,
            s.status.value,
            rollout_id=s.rollout_id,
            why=f"the command is for wave {cmd.wave} but the rollout {at}",
        )
    reason = f"{cmd.action.value} by {cmd.actor}" + (f": {cmd.reason}" if cmd.reason else "")
    match cmd.action:
        case OperatorAction.START:
            run.start(reason, cmd.actor)
        case OperatorAction.PAUSE:
            run.pause(reason, cmd.actor)
        case OperatorAction.RESUME:
            run.resume(reason, cmd.actor)
        case OperatorAction.PROMOTE:
            if s.status is S.PAUSED:
                run.transition(S.RUNNING, reason, cmd.actor)
            run.advance(WaveOutcome.PROMOTED, reason, cmd.actor)
        case OperatorAction.ROLLBACK:
            run.rollback(WaveOutcome.ROLLED_BACK, reason, cmd.actor)
        case OperatorAction.ABORT:
            run.abort(reason, cmd.actor)
