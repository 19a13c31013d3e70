"""Random event sequences against the machine, with its invariants checked after every step.

Hypothesis draws a policy, an initial fleet and 10 to 60 actions: enrollments (also of devices
already known, with other versions), agent reports in any order and any state, ticks, operator
commands (valid or not), telemetry snapshots, and replays of the previous event. After each step:

- the state round-trips through JSON exactly, and a copy restored from JSON (a restarted server)
  steps to the identical state and commands; ``step`` never mutates its input;
- no device is told two things: at most one AssignTarget (always the target version), at most one
  RevertDevice, only after an assignment and always to the version recorded before the rollout;
- devices moved by the end of each wave never exceed that wave's cumulative target;
- terminal states absorb: no status change and no device command once there;
- rolling back reverts exactly the devices that were assigned;
- a wave ends by passing only after its minimum soak; otherwise it was promoted, skipped (no new
  devices) or stopped; wave i+1 never starts before wave i ended;
- a replayed enrollment, report, tick or snapshot assigns or reverts nobody.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import event as observe
from hypothesis import strategies as st

from slmops.protocol.fleet import DeviceActionState as A
from slmops.server.rollouts.machine import (
    AssignTarget,
    Cohort,
    CohortFigure,
    DeviceReport,
    DevicesMatched,
    InvalidTransition,
    MatchedDevice,
    MetricSnapshot,
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
    WaveOutcome,
    WaveStarted,
    create_rollout,
    step,
)

POOL = [f"dev-{i:02}" for i in range(14)]
CLASSES = ["pi5", "jetson"]
VERSIONS = [None, "v0", "v1", "v1", "v2"]  # v2 is the target: such devices are skipped
TARGET = "v2"

POLICIES = [
    RolloutPolicy.from_data({"gates": {"min_soak_seconds": 100, "timeout_seconds": 2000}}),
    RolloutPolicy.from_data(
        {
            "waves": [{"count": 1}, {"count": 3}, {"percent": 50}, {"percent": 100}],
            "gates": {"min_soak_seconds": 50, "timeout_seconds": 900, "on_failure": "pause"},
            "auto_advance": False,
        }
    ),
    RolloutPolicy.from_data(
        {
            "waves": [{"percent": 20, "gates": {"min_soak_seconds": 300}}, {"percent": 100}],
            "gates": {
                "min_soak_seconds": 0,
                "timeout_seconds": 1500,
                "on_timeout": "rollback",
                "min_reported": 0.5,
                "metrics": [{"metric": "error_rate", "better": "lower", "min_samples": 20}],
            },
        }
    ),
    RolloutPolicy.from_data(
        {
            "gates": {
                "min_soak_seconds": 10,
                "timeout_seconds": 400,
                "max_health_failures": 1,
                "max_health_failure_rate": None,
                "min_success_rate": 0.5,
                "on_failure": "pause",
            }
        }
    ),
]

_match = st.lists(
    st.tuples(st.sampled_from(POOL), st.sampled_from(CLASSES), st.sampled_from(VERSIONS)),
    min_size=1,
    max_size=5,
).map(lambda ds: ("match", ds))
_report = st.tuples(
    st.just("report"),
    st.integers(0, 100),  # index into the assigned devices at run time (or the pool)
    st.sampled_from([A.ACTIVE, A.ACTIVE, A.ACTIVE, A.ROLLED_BACK, *A]),
    st.none() | st.sampled_from(list(A)),
)
_op = st.tuples(
    st.just("op"),
    st.sampled_from(list(OperatorAction)),
    st.none() | st.integers(0, 3),
)
_figure = st.builds(
    CohortFigure,
    hardware_class=st.sampled_from(CLASSES),
    cohort=st.sampled_from(list(Cohort)),
    metric=st.just("error_rate"),
    value=st.floats(0, 1),
    samples=st.integers(0, 60),
)
_metrics = st.lists(_figure, max_size=4).map(lambda fs: ("metrics", fs))
_action = st.one_of(
    _report,
    _report,
    st.just(("burst",)),  # every moved device that has not finished reports active
    st.just(("tick",)),
    st.just(("tick",)),
    _op,
    _match,
    _metrics,
    st.just(("replay",)),
)
_steps = st.lists(st.tuples(st.floats(0, 400), _action), min_size=10, max_size=60)


def _events(action: tuple[Any, ...], state: RolloutState) -> list[RolloutEvent]:
    if action[0] == "burst":
        return [
            DeviceReport(device_id=i, state=A.ACTIVE)
            for i, d in state.devices.items()
            if d.wave is not None and not (d.state and d.state.is_final)
        ]
    return [_event(action, state)]


def _event(action: tuple[Any, ...], state: RolloutState) -> RolloutEvent:
    kind = action[0]
    if kind == "match":
        return DevicesMatched(
            devices=[
                MatchedDevice(device_id=d, hardware_class=hw, current_version=v)
                for d, hw, v in action[1]
            ]
        )
    if kind == "report":
        moved = state.assigned or POOL
        return DeviceReport(
            device_id=moved[action[1] % len(moved)], state=action[2], failed_stage=action[3]
        )
    if kind == "op":
        return OperatorCommand(action=action[1], actor="op", wave=action[2])
    if kind == "metrics":
        return MetricSnapshot(figures=action[1])
    return Tick()


class Ledger:
    """Every device command seen so far, checked as it arrives."""

    def __init__(self) -> None:
        self.assigned: dict[str, str | None] = {}  # device -> from_version at assignment
        self.reverted: set[str] = set()

    def record(self, commands: list[RolloutCommand], state: RolloutState) -> None:
        for c in commands:
            if isinstance(c, AssignTarget):
                assert c.device_id not in self.assigned, f"{c.device_id} assigned twice"
                assert c.version == TARGET
                self.assigned[c.device_id] = state.devices[c.device_id].from_version
            elif isinstance(c, RevertDevice):
                assert c.device_id in self.assigned, f"{c.device_id} reverted, never assigned"
                assert c.device_id not in self.reverted, f"{c.device_id} reverted twice"
                assert c.to_version == self.assigned[c.device_id]
                self.reverted.add(c.device_id)


def _check_state(state: RolloutState, ledger: Ledger) -> None:
    assert RolloutState.from_json(state.to_json()) == state
    for device_id, d in state.devices.items():
        assert not (d.skipped and d.wave is not None)
        assert (d.wave is None) == (d.assigned_at is None)
        assert d.reverted_at is None or d.wave is not None
        assert (d.wave is not None) == (device_id in ledger.assigned)
        assert (d.reverted_at is not None) == (device_id in ledger.reverted)
        if d.wave is not None:
            assert ledger.assigned[device_id] == d.from_version
    if state.wave is not None:
        targets = state.targets()
        for j in range(state.wave + 1):
            moved = sum(1 for d in state.devices.values() if d.wave is not None and d.wave <= j)
            assert moved <= targets[j], f"waves 0..{j} moved {moved} > target {targets[j]}"
    assert [w.index for w in state.waves] == list(range(len(state.waves)))
    for w in state.waves:
        assert (w.outcome is None) == (w.ended_at is None)
        if w.outcome is WaveOutcome.PASSED:
            assert w.ended_at is not None
            soak = state.policy.gates_for(w.index).min_soak_seconds
            assert w.ended_at - w.started_at >= soak, f"wave {w.index} passed before its soak"
        if w.outcome is WaveOutcome.SKIPPED:
            assert not any(d.wave == w.index for d in state.devices.values())
        if w.index + 1 < len(state.waves):
            assert w.outcome is not None, f"wave {w.index + 1} started while {w.index} was open"
    if state.status in (RolloutStatus.ROLLING_BACK, RolloutStatus.ROLLED_BACK):
        assert ledger.reverted == set(ledger.assigned)


_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,  # keep the working tree clean; a failure prints its reproducing example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_SETTINGS
@given(
    policy=st.sampled_from(POLICIES),
    seed=st.sampled_from(["s1", "s2"]),
    initial=_match,
    scheduled=st.booleans(),
    steps=_steps,
)
def test_invariants_hold_after_every_step(
    policy: RolloutPolicy,
    seed: str,
    initial: tuple[str, Any],
    scheduled: bool,
    steps: list[tuple[float, tuple[Any, ...]]],
) -> None:
    _run(policy, seed, initial, scheduled, steps)


_healthy_steps = st.lists(
    st.tuples(
        st.floats(0, 400),
        st.one_of(
            st.just(("burst",)),
            st.just(("tick",)),
            st.just(("replay",)),
            _match,
            st.tuples(
                st.just("op"),
                st.sampled_from(
                    [OperatorAction.PROMOTE, OperatorAction.PAUSE, OperatorAction.RESUME]
                ),
                st.none(),
            ),
        ),
    ),
    min_size=10,
    max_size=60,
)


@_SETTINGS
@given(
    policy=st.sampled_from(POLICIES),
    initial=st.lists(
        st.tuples(st.sampled_from(POOL), st.sampled_from(CLASSES), st.sampled_from(VERSIONS)),
        min_size=4,
        max_size=14,
    ).map(lambda ds: ("match", ds)),
    steps=_healthy_steps,
)
def test_invariants_hold_in_mostly_healthy_rollouts(
    policy: RolloutPolicy, initial: tuple[str, Any], steps: list[tuple[float, tuple[Any, ...]]]
) -> None:
    """Fewer failures and more enrollments, so that later waves and late joins are exercised."""
    _run(policy, "s1", initial, False, steps)


def _run(
    policy: RolloutPolicy,
    seed: str,
    initial: tuple[str, Any],
    scheduled: bool,
    steps: list[tuple[float, tuple[Any, ...]]],
) -> None:
    state = create_rollout(
        "r", TARGET, now=0.0, policy=policy, seed=seed, start_at=50.0 if scheduled else None
    )
    ledger = Ledger()
    now = 0.0
    state, out = step(state, _event(initial, state), now)
    ledger.record(out, state)
    if not scheduled:
        state, out = step(state, OperatorCommand(action=OperatorAction.START, actor="op"), now)
        ledger.record(out, state)
    _check_state(state, ledger)
    previous: tuple[RolloutEvent, float] | None = None

    for dt, action in steps:
        replay = action[0] == "replay"
        if replay:
            if previous is None:
                continue
            events, at = [previous[0]], previous[1]  # delivered twice, at the same time
        else:
            now += dt
            events, at = _events(action, state), now
        for event in events:
            state, _ = _checked_step(state, event, at, ledger, replay=replay)
            previous = (event, at)
    observe(f"ended {state.status.value}")
    observe(f"reached wave {state.wave}")


def _checked_step(
    state: RolloutState, event: RolloutEvent, now: float, ledger: Ledger, *, replay: bool
) -> tuple[RolloutState, RolloutEvent]:
    """One step with every per-step invariant asserted; returns the state to continue from."""
    before_json = state.to_json()
    restored = RolloutState.from_json(before_json)
    try:
        new, out = step(state, event, now)
    except InvalidTransition:
        assert isinstance(event, OperatorCommand)
        assert state.to_json() == before_json
        return state, event
    assert state.to_json() == before_json, "step mutated its input"
    again, again_out = step(restored, event, now)  # as after a restart
    assert again.to_json() == new.to_json() and again_out == out

    if state.status.is_terminal:
        assert new.status is state.status
        assert not [
            c
            for c in out
            if isinstance(c, AssignTarget | RevertDevice | WaveStarted | StateChanged)
        ]
    if replay and not isinstance(event, OperatorCommand):
        assert not [c for c in out if isinstance(c, AssignTarget | RevertDevice)]
    promoted = isinstance(event, OperatorCommand) and event.action is OperatorAction.PROMOTE
    for w_old, w_new in zip(state.waves, new.waves, strict=False):
        if w_old.outcome is None and w_new.outcome is WaveOutcome.PROMOTED:
            assert promoted
    ledger.record(out, new)
    _check_state(new, ledger)
    return new, event
