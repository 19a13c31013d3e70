"""Gates over a snapshot of facts: pass, fail or wait, always with the numbers that decided it."""

from __future__ import annotations

from typing import Any

import pytest

from slmops.server.rollouts.machine import (
    Cohort,
    GateStatus,
    MetricGate,
    Verdict,
    WaveFacts,
    WaveGates,
    evaluate,
)
from slmops.server.rollouts.machine.gates import ReceivedFigure


def facts(**kw: Any) -> WaveFacts:
    base: dict[str, Any] = dict(
        wave=0,
        soak_elapsed=1000.0,
        undecided_for=1000.0,
        devices=10,
        reported=10,
        succeeded=10,
        health_failures=0,
        canary_classes=["pi5"],
        figures=[],
    )
    return WaveFacts(**(base | kw))


def by_gate(gates: WaveGates, f: WaveFacts) -> dict[str, Any]:
    ev = evaluate(gates, f, at=5.0)
    return {r.gate: r for r in ev.results} | {"verdict": ev.verdict}


def test_all_pass() -> None:
    r = by_gate(WaveGates(), facts())
    assert r["verdict"] is Verdict.PASS
    assert {k for k in r if k != "verdict"} == {
        "soak",
        "reported",
        "success_rate",
        "health_failures",
    }


def test_soak_waits_with_elapsed_and_threshold() -> None:
    r = by_gate(WaveGates(min_soak_seconds=600), facts(soak_elapsed=120))
    assert r["verdict"] is Verdict.WAIT
    soak = r["soak"]
    assert (soak.status, soak.observed, soak.threshold) == (GateStatus.WAIT, 120, 600)
    assert soak.detail == "120 s of 600 s soak elapsed"


def test_reported_rounds_the_requirement_up() -> None:
    r = by_gate(WaveGates(min_reported=0.9), facts(devices=10, reported=8, succeeded=8))
    assert r["reported"].status is GateStatus.WAIT
    assert r["reported"].detail == "8 of 10 wave devices in a final state (need 9)"
    r = by_gate(WaveGates(min_reported=0.9), facts(devices=10, reported=9, succeeded=9))
    assert r["reported"].status is GateStatus.PASS


def test_success_rate_fails_as_soon_as_it_cannot_pass() -> None:
    gates = WaveGates(min_success_rate=0.95, max_health_failure_rate=None)
    # 1 of 20 failed so far: 19/20 = 95% is still reachable
    r = by_gate(gates, facts(devices=20, reported=5, succeeded=4))
    assert r["success_rate"].status is GateStatus.WAIT and r["verdict"] is Verdict.WAIT
    # a second failure: at best 18/20 = 90%, the wave can no longer pass
    r = by_gate(gates, facts(devices=20, reported=6, succeeded=4))
    res = r["success_rate"]
    assert (res.status, res.threshold, res.samples) == (GateStatus.FAIL, 0.95, 6)
    assert res.observed == pytest.approx(4 / 6)
    assert r["verdict"] is Verdict.FAIL
    # exactly at the threshold passes (exact decimal arithmetic: 19/20 == 0.95)
    r = by_gate(gates, facts(devices=20, reported=20, succeeded=19))
    assert r["success_rate"].status is GateStatus.PASS


def test_health_failures_count_and_rate_take_the_stricter() -> None:
    gates = WaveGates(max_health_failures=3, max_health_failure_rate=0.05)
    r = by_gate(gates, facts(devices=100, reported=100, succeeded=97, health_failures=3))
    assert r["health_failures"].threshold == 3 and r["health_failures"].status is GateStatus.PASS
    r = by_gate(gates, facts(devices=20, reported=20, succeeded=19, health_failures=2))
    assert r["health_failures"].threshold == 1 and r["health_failures"].status is GateStatus.FAIL
    none = WaveGates(max_health_failures=None, max_health_failure_rate=None)
    assert "health_failures" not in by_gate(none, facts())


def test_no_devices_waits_and_times_out() -> None:
    gates = WaveGates(timeout_seconds=3600)
    r = by_gate(gates, facts(devices=0, reported=0, succeeded=0, undecided_for=10))
    assert r["verdict"] is Verdict.WAIT and r["reported"].detail == "no devices in this wave yet"
    r = by_gate(gates, facts(devices=0, reported=0, succeeded=0, undecided_for=3600))
    assert r["verdict"] is Verdict.TIMEOUT
    assert (r["timeout"].observed, r["timeout"].threshold) == (3600, 3600)


def test_failure_beats_timeout() -> None:
    gates = WaveGates(timeout_seconds=3600)
    f = facts(devices=1, reported=1, succeeded=0, undecided_for=9999)
    assert by_gate(gates, f)["verdict"] is Verdict.FAIL


def fig(
    cohort: Cohort, value: float, samples: int, hw: str = "pi5", metric: str = "p95"
) -> ReceivedFigure:
    return ReceivedFigure(
        hardware_class=hw, cohort=cohort, metric=metric, value=value, samples=samples, received_at=0
    )


LATENCY = MetricGate(metric="p95", better="lower", tolerance=0.1, abs_tolerance=5, min_samples=50)


def test_metric_gate_compares_canary_with_baseline_per_class() -> None:
    gates = WaveGates(metrics=[LATENCY])
    ok = facts(figures=[fig(Cohort.CANARY, 114, 80), fig(Cohort.BASELINE, 100, 900)])
    r = by_gate(gates, ok)["metric:p95[pi5]"]
    assert (r.status, r.observed, r.baseline, r.threshold, r.samples) == (
        GateStatus.PASS,
        114,
        100,
        pytest.approx(115),
        80,
    )
    bad = facts(figures=[fig(Cohort.CANARY, 130, 80), fig(Cohort.BASELINE, 100, 900)])
    out = by_gate(gates, bad)
    assert out["verdict"] is Verdict.FAIL
    assert (
        "canary p95 130 vs baseline 100 (limit 115, lower is better"
        in out["metric:p95[pi5]"].detail
    )


def test_metric_gate_higher_is_better() -> None:
    tps = MetricGate(metric="tps", better="higher", tolerance=0.2, min_samples=10)
    f = facts(
        figures=[
            fig(Cohort.CANARY, 79, 10, metric="tps"),
            fig(Cohort.BASELINE, 100, 10, metric="tps"),
        ]
    )
    r = by_gate(WaveGates(metrics=[tps]), f)["metric:tps[pi5]"]
    assert r.status is GateStatus.FAIL and r.threshold == pytest.approx(80)


def test_metric_gate_waits_for_figures_and_samples_on_every_class() -> None:
    gates = WaveGates(metrics=[LATENCY])
    f = facts(
        canary_classes=["jetson", "pi5"],
        figures=[fig(Cohort.CANARY, 100, 10), fig(Cohort.BASELINE, 100, 900)],
    )
    out = by_gate(gates, f)
    assert out["verdict"] is Verdict.WAIT
    assert (
        out["metric:p95[jetson]"].detail
        == "jetson: no canary and baseline figures for p95 since the wave began"
    )
    assert (
        out["metric:p95[pi5]"].detail
        == "pi5: 10 canary and 900 baseline samples of p95 (need 50 in each)"
    )
    assert by_gate(gates, facts(canary_classes=[]))["metric:p95"].status is GateStatus.WAIT
