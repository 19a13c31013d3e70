"""RolloutPolicy is user input: defaults, overrides, and clear errors for every bad shape."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from slmops.core.errors import ConfigError
from slmops.server.rollouts.machine import FailureAction, MetricGate, RolloutPolicy, WaveGates


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        RolloutPolicy.from_data(data, source="blueprint.yaml")
    return info.value.render()


def test_defaults_are_the_documented_plan() -> None:
    p = RolloutPolicy()
    assert [w.percent for w in p.waves] == [1, 10, 50, 100]
    assert p.auto_advance is True
    assert p.gates.on_failure is FailureAction.ROLLBACK
    assert p.gates.on_timeout is FailureAction.PAUSE
    assert p.gates.min_soak_seconds < p.gates.timeout_seconds


def test_yaml_shaped_policy_loads() -> None:
    p = RolloutPolicy.from_data(
        {
            "waves": [
                {"count": 2, "gates": {"min_soak_seconds": 3600}},
                {"percent": 25},
                {"percent": 100},
            ],
            "gates": {
                "min_soak_seconds": 60,
                "max_health_failures": 1,
                "metrics": [{"metric": "latency_p95_ms", "better": "lower", "tolerance": 0.2}],
            },
            "auto_advance": False,
        }
    )
    canary, later = p.gates_for(0), p.gates_for(1)
    assert canary.min_soak_seconds == 3600 and later.min_soak_seconds == 60
    # an override replaces only the keys it names
    assert canary.max_health_failures == 1 and canary.metrics == later.metrics
    assert later.metrics == [MetricGate(metric="latency_p95_ms", better="lower", tolerance=0.2)]


def test_json_round_trip_keeps_overrides_partial() -> None:
    p = RolloutPolicy.from_data(
        {"waves": [{"percent": 5, "gates": {"min_soak_seconds": 900}}, {"percent": 100}]}
    )
    again = RolloutPolicy.model_validate_json(p.model_dump_json())
    assert again == p
    assert again.gates_for(0).min_reported == p.gates.min_reported


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"waves": [{"percent": 150}]},
            "'waves.0.percent': Input should be less than or equal to 100",
        ),
        ({"waves": [{"percent": 0}, {"percent": 100}]}, "'waves.0.percent'"),
        ({"waves": [{"count": 0}, {"percent": 100}]}, "'waves.0.count'"),
        (
            {"waves": [{"percent": 50}, {"percent": 10}, {"percent": 100}]},
            "wave 1 (10%) does not grow",
        ),
        (
            {"waves": [{"count": 5}, {"count": 5}, {"percent": 100}]},
            "wave 1 (5 devices) does not grow",
        ),
        (
            {"waves": [{"percent": 10}, {"percent": 60}]},
            "the last wave must be {percent: 100} (got 60%)",
        ),
        ({"waves": [{"percent": 100}, {"count": 3}]}, "the last wave must be {percent: 100}"),
        (
            {"waves": [{"percent": 5, "count": 3}, {"percent": 100}]},
            "exactly one of 'percent' or 'count'",
        ),
        ({"waves": [{}]}, "exactly one of 'percent' or 'count'"),
        ({"waves": []}, "'waves': List should have at least 1 item"),
        ({"wavez": []}, "unknown key 'wavez'"),
        ({"waves": [{"percent": 100, "soak": 5}]}, "unknown key 'waves.0.soak'"),
        ({"gates": {"min_success_rate": 1.5}}, "'gates.min_success_rate'"),
        ({"gates": {"on_failure": "explode"}}, "'gates.on_failure'"),
        ({"gates": {"min_soak_seconds": 7200, "timeout_seconds": 3600}}, "would time out before"),
        (
            {"waves": [{"percent": 1, "gates": {"min_soak_seconds": 100000}}, {"percent": 100}]},
            "wave 0 gates: timeout_seconds (86400) must be longer than min_soak_seconds (100000)",
        ),
        (
            {"gates": {"metrics": [{"metric": "x", "better": "sideways"}]}},
            "'gates.metrics.0.better'",
        ),
        ({"gates": {"min_soak_seconds": float("inf")}}, "'gates.min_soak_seconds'"),
    ],
)
def test_bad_policies_name_the_key_and_the_problem(data: Any, expected: str) -> None:
    message = _error(data)
    assert message.startswith("blueprint.yaml: ")
    assert expected in message


def test_too_many_waves() -> None:
    waves = [{"count": i} for i in range(1, 101)] + [{"percent": 100}]
    assert "at most 100 waves" in _error({"waves": waves})


def test_wave_gates_alone_validate_too() -> None:
    with pytest.raises(ValidationError, match="would time out"):
        WaveGates(min_soak_seconds=10, timeout_seconds=10)


_step = st.one_of(
    st.fixed_dictionaries({"percent": st.floats(-10, 200) | st.just(float("nan"))}),
    st.fixed_dictionaries({"count": st.integers(-3, 50)}),
    st.fixed_dictionaries({"percent": st.floats(0, 100), "count": st.integers(0, 9)}),
)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(_step, max_size=6))
def test_any_wave_list_is_accepted_or_refused_with_a_config_error(waves: list[Any]) -> None:
    try:
        p = RolloutPolicy.from_data({"waves": waves})
    except ConfigError as exc:
        assert exc.message  # refused, with a message; never another exception type
        return
    percents = [w.percent for w in p.waves if w.percent is not None]
    counts = [w.count for w in p.waves if w.count is not None]
    assert percents == sorted(set(percents)) and counts == sorted(set(counts))
    assert p.waves[-1].percent == 100
