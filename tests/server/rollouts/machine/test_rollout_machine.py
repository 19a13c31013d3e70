"""Example rollouts driven through `step` with an injected clock, one scenario per behaviour."""

from __future__ import annotations

from typing import Any

import pytest

from slmops.core.errors import UserInputError
from slmops.protocol.fleet import DeviceActionState as A
from slmops.server.rollouts.machine import (
    COMMAND_ADAPTER,
    EVENT_ADAPTER,
    AssignTarget,
    DecisionAction,
    DeviceReport,
    DevicesMatched,
    GateDecision,
    InvalidTransition,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RevertDevice,
    RolloutCommand,
    RolloutEvent,
    RolloutPolicy,
    RolloutState,
    RolloutStatus,
    StateChanged,
    Tick,
    Verdict,
    WaveOutcome,
    WaveStarted,
    create_rollout,
    step,
)

S = RolloutStatus
FAST = {"min_soak_seconds": 600, "timeout_seconds": 7200}


def matched(ids: list[str], version: str | None = "v1", hw: str | None = None) -> DevicesMatched:
    return DevicesMatched(
        devices=[
            MatchedDevice(
                device_id=i, hardware_class=hw or ("pi5", "jetson")[n % 2], current_version=version
            )
            for n, i in enumerate(ids)
        ]
    )


class Sim:
    """Drives one rollout and keeps every command it produced."""

    def __init__(self, policy: dict[str, Any] | None = None, **kw: Any) -> None:
        p = RolloutPolicy.from_data(policy or {"gates": FAST})
        self.state = create_rollout("r1", "v2", now=0.0, policy=p, **kw)
        self.now = 0.0
        self.log: list[RolloutCommand] = []

    def send(self, event: RolloutEvent, at: float | None = None) -> list[RolloutCommand]:
        self.now = self.now if at is None else at
        self.state, commands = step(self.state, event, self.now)
        self.log += commands
        return commands

    def op(self, action: str, at: float | None = None, **kw: Any) -> list[RolloutCommand]:
        return self.send(OperatorCommand(action=OperatorAction(action), actor="alice", **kw), at)

    def report(self, device: str, state: A, **kw: Any) -> list[RolloutCommand]:
        return self.send(DeviceReport(device_id=device, state=state, **kw))

    def in_wave(self, wave: int) -> list[str]:
        return [i for i, d in self.state.devices.items() if d.wave == wave]

    def install(self, devices: list[str], final: A = A.ACTIVE) -> None:
        for d in devices:
            for s in (A.SCHEDULED, A.DOWNLOADING, A.VERIFYING, A.INSTALLING, A.HEALTH_CHECKING):
                self.report(d, s)
            self.report(d, final)

    def of(self, kind: type[Any]) -> list[Any]:
        return [c for c in self.log if isinstance(c, kind)]


def fleet(n: int, **kw: Any) -> Sim:
    sim = Sim(**kw)
    sim.send(matched([f"d{i:03}" for i in range(n)]))
    return sim


def test_healthy_rollout_runs_every_wave_to_success() -> None:
    sim = fleet(100)
    sim.op("start", at=10)
    for wave, expected in enumerate([1, 9, 40, 50]):
        assert sim.state.status is S.RUNNING and sim.state.wave == wave
        devices = sim.in_wave(wave)
        assert len(devices) == expected
        sim.install(devices)
        sim.send(Tick(), at=sim.now + 599)  # one second short of the soak: nothing moves
        assert sim.state.wave == wave
        sim.send(Tick(), at=sim.now + 1)
    assert sim.state.status is S.SUCCEEDED
    assert [w.outcome for w in sim.state.waves] == [WaveOutcome.PASSED] * 4
    assigns = sim.of(AssignTarget)
    assert sorted(a.device_id for a in assigns) == sorted(sim.state.devices)
    assert {a.version for a in assigns} == {"v2"}
    assert not sim.of(RevertDevice)
    assert [(h.from_status, h.to_status) for h in sim.state.history] == [
        (S.CREATED, S.RUNNING),
        (S.RUNNING, S.SUCCEEDED),
    ]
    decisions = sim.of(GateDecision)
    assert [d.action for d in decisions] == [DecisionAction.ADVANCE] * 4
    assert sim.state.waves[3].decision is not None
    assert sim.state.waves[3].decision.verdict is Verdict.PASS


def test_canary_health_failure_rolls_back_at_once_with_the_numbers() -> None:
    sim = fleet(100)
    sim.op("start", at=0)
    (canary,) = sim.in_wave(0)
    sim.send(Tick(), at=30)
    sim.report(canary, A.HEALTH_CHECKING)
    out = sim.report(canary, A.FAILED, detail="probe: empty completion")
    assert sim.state.status is S.ROLLING_BACK  # no need to wait for the soak
    assert [c.kind for c in out] == ["gate-decision", "state-changed", "revert-device"]
    decision = out[0]
    assert isinstance(decision, GateDecision) and decision.action is DecisionAction.ROLLBACK
    results = {r.gate: r for r in decision.evaluation.results}
    health = results["health_failures"]
    assert (health.status, health.observed, health.threshold, health.samples) == ("fail", 1, 0, 1)
    assert results["success_rate"].status == "fail"
    assert out[2] == RevertDevice(device_id=canary, to_version="v1")
    wave0 = sim.state.waves[0]
    assert wave0.outcome is WaveOutcome.FAILED and wave0.decision == decision.evaluation
    assert sim.state.devices[canary].failed_stage is A.HEALTH_CHECKING
    assert sim.state.history[-1].reason == (
        "wave 0 failed: 0 of 1 reported devices active (need 95.0%); "
        "1 health-check failures among 1 wave devices (allowed 0)"
    )

    sim.report(canary, A.ROLLED_BACK)
    assert sim.state.status is S.ROLLED_BACK
    assert len(sim.of(AssignTarget)) == 1  # nobody else was ever told to move


def test_self_rollback_on_device_counts_as_health_failure() -> None:
    sim = fleet(100)
    sim.op("start")
    (canary,) = sim.in_wave(0)
    sim.report(canary, A.ROLLED_BACK, detail="agent swapped back after failed probe")
    assert sim.state.status is S.ROLLED_BACK  # reverted device already reports rolled-back
    assert sim.of(RevertDevice) == [RevertDevice(device_id=canary, to_version="v1")]


def test_failure_with_pause_action_pauses_and_resume_re_arms() -> None:
    sim = fleet(100, policy={"gates": FAST | {"on_failure": "pause"}})
    sim.op("start")
    (canary,) = sim.in_wave(0)
    sim.report(canary, A.FAILED, failed_stage=A.DOWNLOADING)
    assert sim.state.status is S.PAUSED and not sim.of(RevertDevice)
    sim.op("resume", at=50)  # still failing: pauses again, with a decision to show why
    assert sim.state.status is S.PAUSED
    assert [d.action for d in sim.of(GateDecision)] == [DecisionAction.PAUSE] * 2
    sim.report(canary, A.ACTIVE)  # retried and recovered
    sim.op("resume", at=700)
    assert sim.state.wave == 1


def test_timeout_pauses_and_resume_restarts_the_clock() -> None:
    sim = fleet(100)
    sim.op("start", at=0)
    sim.send(Tick(), at=7199)
    assert sim.state.status is S.RUNNING
    out = sim.send(Tick(), at=7200)
    assert sim.state.status is S.PAUSED
    decision = out[0]
    assert isinstance(decision, GateDecision)
    assert (
        decision.evaluation.verdict is Verdict.TIMEOUT and decision.action is DecisionAction.PAUSE
    )
    timeout = decision.evaluation.results[-1]
    assert (timeout.gate, timeout.observed, timeout.threshold) == ("timeout", 7200, 7200)
    sim.op("resume", at=10000)
    sim.send(Tick(), at=10000 + 7199)
    assert sim.state.status is S.RUNNING
    sim.send(Tick(), at=10000 + 7200)
    assert sim.state.status is S.PAUSED


def test_timeout_with_rollback_action() -> None:
    sim = fleet(10, policy={"gates": FAST | {"on_timeout": "rollback"}})
    sim.op("start")
    sim.send(Tick(), at=7200)
    assert sim.state.status is S.ROLLING_BACK
    assert sim.state.waves[0].outcome is WaveOutcome.TIMED_OUT


def test_late_devices_join_the_current_wave_or_wait_their_turn() -> None:
    sim = fleet(100)
    sim.op("start")
    assert len(sim.in_wave(0)) == 1
    out = sim.send(matched([f"late{i}" for i in range(50)]))  # 150 devices: 1% is now 2
    assert [c.kind for c in out] == ["assign-target"]
    assert len(sim.in_wave(0)) == 2
    assert sum(d.wave is None for d in sim.state.devices.values()) == 148
    # replaying the same enrollment changes nothing
    assert sim.send(matched([f"late{i}" for i in range(50)])) == []
    # while paused nobody is assigned; resume tops the wave up
    sim.op("pause")
    assert sim.send(matched([f"later{i}" for i in range(60)])) == []  # 210 devices: 1% is 3
    out = sim.op("resume")
    assert [c.kind for c in out] == ["state-changed", "assign-target"]
    assert len(sim.in_wave(0)) == 3


def test_rollout_with_nothing_to_move_succeeds_at_once() -> None:
    """Waiting would only end in a timeout; devices that enroll later get the blueprint's stable
    version, which this success sets to the target."""
    sim = fleet(0)
    sim.op("start")
    assert (sim.state.status, sim.state.wave, sim.state.devices) == (S.SUCCEEDED, None, {})
    assert "no device matched" in sim.state.history[-1].reason
    sim.send(matched(["late"]))
    assert sim.of(AssignTarget) == []  # terminal: the blueprint's stable version governs it
    on_target = Sim()
    on_target.send(matched(["a", "b"], version="v2"))
    on_target.op("start")
    assert on_target.state.status is S.SUCCEEDED
    assert "all 2 matched devices already run v2" in on_target.state.history[-1].reason


def test_devices_already_on_target_are_skipped_not_counted() -> None:
    sim = Sim()
    sim.send(matched(["a", "b"], version="v2"))
    sim.send(matched([f"d{i}" for i in range(10)], version=None))
    sim.op("start")
    assert sim.state.total == 10
    assert sim.state.devices["a"].status == "skipped"
    assert all(sim.state.devices[x].wave is None for x in ("a", "b"))
    assert sim.state.devices["d0"].from_version is None
    sim.op("rollback")
    assert {r.to_version for r in sim.of(RevertDevice)} == {None}


def test_one_device_fleet_skips_empty_waves() -> None:
    sim = fleet(1)
    sim.op("start")
    sim.install(sim.in_wave(0))
    sim.send(Tick(), at=600)
    assert sim.state.status is S.SUCCEEDED
    assert [w.outcome for w in sim.state.waves] == [WaveOutcome.PASSED] + [WaveOutcome.SKIPPED] * 3
    assert [w.wave for w in sim.of(WaveStarted)] == [0]


def test_promote_skips_soak_and_gates() -> None:
    sim = fleet(100)
    sim.op("start")
    out = sim.op("promote", at=5)
    assert sim.state.wave == 1 and sim.state.waves[0].outcome is WaveOutcome.PROMOTED
    assert sim.state.waves[0].ended_by == "alice"
    assert [c.kind for c in out] == ["wave-started"] + ["assign-target"] * 9
    with pytest.raises(InvalidTransition, match="for wave 0 but the rollout is at wave 1"):
        sim.op("promote", wave=0)  # a repeated click never skips a second wave
    sim.op("pause")
    sim.op("promote", wave=1)  # from paused: resumes and advances
    assert (sim.state.status, sim.state.wave) == (S.RUNNING, 2)
    sim.op("promote")
    sim.op("promote")
    assert sim.state.status is S.SUCCEEDED
    assert len(sim.of(AssignTarget)) == 100


def test_manual_advance_waits_for_promote() -> None:
    sim = fleet(100, policy={"gates": FAST, "auto_advance": False})
    sim.op("start")
    sim.install(sim.in_wave(0))
    sim.send(Tick(), at=600)
    sim.send(Tick(), at=900)
    assert sim.state.wave == 0
    decisions = sim.of(GateDecision)
    assert [d.action for d in decisions] == [DecisionAction.AWAIT_PROMOTE]  # once, not per tick
    sim.op("promote", wave=0)
    assert sim.state.wave == 1 and sim.state.waves[0].outcome is WaveOutcome.PROMOTED


def test_abort_stops_without_reverting() -> None:
    sim = fleet(100)
    sim.op("start")
    sim.op("promote")
    sim.op("abort", reason="wrong model")
    assert sim.state.status is S.ABORTED
    assert not sim.of(RevertDevice)
    assert sim.state.history[-1].reason == "abort by alice: wrong model"
    assert sim.send(matched(["new"])) == [] and "new" not in sim.state.devices
    sim.report(sim.in_wave(1)[0], A.ACTIVE)  # reports are still recorded after the end
    assert sim.state.devices[sim.in_wave(1)[0]].state is A.ACTIVE


def test_operator_rollback_reverts_exactly_the_moved_devices() -> None:
    sim = fleet(100)
    sim.op("start")
    sim.op("promote")
    moved = sorted(sim.in_wave(0) + sim.in_wave(1))
    out = sim.op("rollback", reason="latency regression")
    assert sim.state.status is S.ROLLING_BACK
    assert sorted(c.device_id for c in out if isinstance(c, RevertDevice)) == moved
    for d in moved[:-1]:
        sim.report(d, A.ROLLED_BACK)
    assert sim.state.status is S.ROLLING_BACK
    sim.send(matched(["late"]))
    assert sim.state.devices["late"].wave is None  # nothing is assigned while rolling back
    sim.report(moved[-1], A.ROLLED_BACK)
    assert sim.state.status is S.ROLLED_BACK
    assert sim.state.waves[1].outcome is WaveOutcome.ROLLED_BACK


def test_scheduled_start() -> None:
    sim = fleet(10, start_at=1000.0)
    assert sim.state.status is S.SCHEDULED
    sim.send(Tick(), at=999)
    assert sim.state.status is S.SCHEDULED
    sim.send(Tick(), at=1000)
    assert sim.state.status is S.RUNNING and sim.state.history[-1].actor is None


@pytest.mark.parametrize(
    ("setup", "action", "status"),
    [
        ([], "resume", "created"),
        ([], "promote", "created"),
        ([], "pause", "created"),
        ([], "rollback", "created"),
        (["start"], "start", "running"),
        (["start"], "resume", "running"),
        (["start", "pause"], "pause", "paused"),
        (["start", "abort"], "resume", "aborted"),
        (["start", "abort"], "abort", "aborted"),
        (["start", "rollback"], "rollback", "rolling-back"),
        (["start", "rollback"], "promote", "rolling-back"),
    ],
)
def test_invalid_commands_name_state_and_command(
    setup: list[str], action: str, status: str
) -> None:
    sim = fleet(1)  # one device: with nothing to move, a start would succeed at once
    for a in setup:
        sim.op(a)
    before = sim.state.to_json()
    with pytest.raises(InvalidTransition) as info:
        sim.op(action)
    err = info.value
    assert isinstance(err, UserInputError) and err.exit_code == 2
    assert err.message == f"cannot {action} a rollout that is {status}"
    assert err.where == "rollout r1" and err.hint and f"'{action}' is allowed only" in err.hint
    assert sim.state.to_json() == before


def test_restart_mid_rollout_resumes_exactly() -> None:
    live, restored = fleet(40), None
    live.op("start")
    live.op("promote")
    live.install(live.in_wave(1)[:2])
    restored = RolloutState.from_json(live.state.to_json())
    assert restored == live.state
    events: list[tuple[RolloutEvent, float]] = [
        (DeviceReport(device_id=live.in_wave(1)[2], state=A.FAILED), 10),
        (matched(["x1", "x2", "x3"]), 20),
        (Tick(), 5000),
    ]
    for event, at in events:
        a_state, a_out = step(live.state, event, at)
        b_state, b_out = step(restored, event, at)
        assert a_state == b_state and a_out == b_out
        live.state, restored = a_state, b_state


def test_events_and_commands_round_trip_as_json() -> None:
    sim = fleet(30)
    sim.op("start")
    sim.op("rollback")
    for c in sim.log:
        assert COMMAND_ADAPTER.validate_json(COMMAND_ADAPTER.dump_json(c)) == c
    events: list[RolloutEvent] = [
        matched(["a"]),
        Tick(),
        DeviceReport(device_id="a", state=A.FAILED),
    ]
    for e in events:
        assert EVENT_ADAPTER.validate_json(EVENT_ADAPTER.dump_json(e)) == e
    assert isinstance(EVENT_ADAPTER.validate_python({"kind": "tick"}), Tick)
    assert isinstance(sim.log[0], StateChanged)


def test_metric_gate_regression_rolls_back() -> None:
    from slmops.server.rollouts.machine import CohortFigure, MetricSnapshot

    gates = FAST | {
        "metrics": [
            {
                "metric": "error_rate",
                "better": "lower",
                "tolerance": 0,
                "abs_tolerance": 0.01,
                "min_samples": 50,
            }
        ]
    }
    sim = fleet(100, policy={"gates": gates})
    sim.op("start")
    sim.install(sim.in_wave(0))
    hw = sim.state.devices[sim.in_wave(0)[0]].hardware_class
    sim.send(Tick(), at=700)
    assert sim.state.status is S.RUNNING  # no telemetry yet: the metric gate waits
    fig = {"hardware_class": hw, "metric": "error_rate"}
    sim.send(
        MetricSnapshot(
            figures=[
                CohortFigure(cohort="canary", value=0.08, samples=60, **fig),
                CohortFigure(cohort="baseline", value=0.02, samples=5000, **fig),
            ]
        )
    )
    assert sim.state.status is S.ROLLING_BACK
    decision = sim.state.waves[0].decision
    assert decision is not None
    metric = {r.gate: r for r in decision.results}[f"metric:error_rate[{hw}]"]
    assert (metric.observed, metric.baseline, metric.samples) == (0.08, 0.02, 60)
    assert metric.threshold == pytest.approx(0.03)


def test_now_must_be_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        step(create_rollout("r", "v2", now=0), Tick(), float("nan"))
