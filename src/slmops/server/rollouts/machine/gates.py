"""Gate evaluation: a snapshot of facts in, one result per gate with the numbers that decided it.

A gate is any callable ``(WaveFacts) -> list[GateResult]``. Each result is pass, fail or wait,
with the observed value, the threshold it was held to and the sample size, because the dashboard
shows operators why a wave advanced, paused or rolled back, not just that it did. Built-in gates
judge install outcomes (reported, success rate, health-check failures) and soak time; metric gates
(issue 6) compare canary and baseline cohorts per hardware class from telemetry snapshots and
slot in as just more gates over the same facts.

Verdict: fail if any gate fails (as soon as failure is certain, not only once all devices have
reported); pass if every gate passes; otherwise wait, or timeout once the wave has waited longer
than its ``timeout_seconds``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from fractions import Fraction

from pydantic import Field

from slmops.server.rollouts.machine.policy import MetricGate, WaveGates
from slmops.server.rollouts.machine.status import RolloutModel


class GateStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"
    TIMEOUT = "timeout"


class Cohort(StrEnum):
    CANARY = "canary"  # devices of this rollout running its target version
    BASELINE = "baseline"  # devices of the same hardware class still on their previous version


class CohortFigure(RolloutModel):
    """One aggregated telemetry figure for one cohort of one hardware class."""

    hardware_class: str
    cohort: Cohort
    metric: str
    value: float
    samples: int = Field(ge=0)


class ReceivedFigure(CohortFigure):
    """A figure as the rollout stored it: gates ignore figures received before the wave began."""

    received_at: float


class GateResult(RolloutModel):
    gate: str
    status: GateStatus
    observed: float | None = None
    threshold: float | None = None
    baseline: float | None = None
    samples: int = 0
    detail: str


class GateEvaluation(RolloutModel):
    wave: int
    at: float
    verdict: Verdict
    results: list[GateResult]


class WaveFacts(RolloutModel):
    """Everything gates may look at, computed by the machine from its state at one instant."""

    wave: int
    soak_elapsed: float
    undecided_for: float = Field(description="seconds since the wave started or last resumed")
    devices: int = Field(description="devices assigned in this wave")
    reported: int = Field(description="of those, in a final state")
    succeeded: int = Field(description="of those, active")
    health_failures: int
    canary_classes: list[str] = Field(description="hardware classes with devices moved so far")
    figures: list[ReceivedFigure] = Field(description="telemetry received since the wave began")


Gate = Callable[[WaveFacts], list[GateResult]]


def evaluate(gates: WaveGates, facts: WaveFacts, *, at: float) -> GateEvaluation:
    """Run every gate of ``gates`` over ``facts`` and combine them into one verdict."""
    results: list[GateResult] = []
    for gate in gate_list(gates):
        results.extend(gate(facts))
    statuses = {r.status for r in results}
    if GateStatus.FAIL in statuses:
        verdict = Verdict.FAIL
    elif statuses <= {GateStatus.PASS}:
        verdict = Verdict.PASS
    elif facts.undecided_for >= gates.timeout_seconds:
        verdict = Verdict.TIMEOUT
        results.append(
            GateResult(
                gate="timeout",
                status=GateStatus.FAIL,
                observed=facts.undecided_for,
                threshold=gates.timeout_seconds,
                detail=f"no decision {facts.undecided_for:g} s after the wave started or "
                f"resumed (timeout {gates.timeout_seconds:g} s)",
            )
        )
    else:
        verdict = Verdict.WAIT
    return GateEvaluation(wave=facts.wave, at=at, verdict=verdict, results=results)


def gate_list(gates: WaveGates) -> list[Gate]:
    """The gates a wave runs: built-ins first, then one per configured metric."""
    built_in: list[Gate] = [
        lambda f: [_soak(gates, f)],
        lambda f: [_reported(gates, f)],
        lambda f: [_success_rate(gates, f)],
    ]
    if gates.max_health_failures is not None or gates.max_health_failure_rate is not None:
        built_in.append(lambda f: [_health(gates, f)])
    return built_in + [_metric_gate(m) for m in gates.metrics]


def _frac(x: float) -> Fraction:
    """Exact decimal value of a policy number, so 0.95 * 20 is exactly 19."""
    return Fraction(repr(x))


def _soak(gates: WaveGates, f: WaveFacts) -> GateResult:
    ok = f.soak_elapsed >= gates.min_soak_seconds
    return GateResult(
        gate="soak",
        status=GateStatus.PASS if ok else GateStatus.WAIT,
        observed=f.soak_elapsed,
        threshold=gates.min_soak_seconds,
        detail=f"{f.soak_elapsed:g} s of {gates.min_soak_seconds:g} s soak elapsed",
    )


def _reported(gates: WaveGates, f: WaveFacts) -> GateResult:
    if f.devices == 0:
        return GateResult(
            gate="reported", status=GateStatus.WAIT, detail="no devices in this wave yet"
        )
    need = math.ceil(_frac(gates.min_reported) * f.devices)
    ok = f.reported >= need
    return GateResult(
        gate="reported",
        status=GateStatus.PASS if ok else GateStatus.WAIT,
        observed=f.reported / f.devices,
        threshold=gates.min_reported,
        samples=f.devices,
        detail=f"{f.reported} of {f.devices} wave devices in a final state (need {need})",
    )


def _success_rate(gates: WaveGates, f: WaveFacts) -> GateResult:
    need = _frac(gates.min_success_rate)
    pending = f.devices - f.reported
    rate = f.succeeded / f.reported if f.reported else None
    text = f"{f.succeeded} of {f.reported} reported devices active"
    if f.devices and Fraction(f.succeeded + pending, f.devices) < need:
        status = GateStatus.FAIL  # even if every pending device succeeds, the rate stays too low
        if pending:
            text += f", too few even if the {pending} pending succeed"
    elif f.reported and Fraction(f.succeeded, f.reported) >= need:
        status = GateStatus.PASS
    else:
        status = GateStatus.WAIT
    return GateResult(
        gate="success_rate",
        status=status,
        observed=rate,
        threshold=gates.min_success_rate,
        samples=f.reported,
        detail=f"{text} (need {gates.min_success_rate:.1%})",
    )


def _health(gates: WaveGates, f: WaveFacts) -> GateResult:
    limits = []
    if gates.max_health_failures is not None:
        limits.append(gates.max_health_failures)
    if gates.max_health_failure_rate is not None:
        limits.append(math.floor(_frac(gates.max_health_failure_rate) * f.devices))
    allowed = min(limits)
    ok = f.health_failures <= allowed
    return GateResult(
        gate="health_failures",
        status=GateStatus.PASS if ok else GateStatus.FAIL,
        observed=f.health_failures,
        threshold=allowed,
        samples=f.devices,
        detail=f"{f.health_failures} health-check failures among {f.devices} wave devices "
        f"(allowed {allowed})",
    )


def _metric_gate(gate: MetricGate) -> Gate:
    def run(f: WaveFacts) -> list[GateResult]:
        if not f.canary_classes:
            return [
                GateResult(
                    gate=f"metric:{gate.metric}",
                    status=GateStatus.WAIT,
                    detail="no devices moved yet, so no canary cohort",
                )
            ]
        return [_metric_for_class(gate, f, hw) for hw in f.canary_classes]

    return run


def _metric_for_class(gate: MetricGate, f: WaveFacts, hardware_class: str) -> GateResult:
    name = f"metric:{gate.metric}[{hardware_class}]"
    found: dict[Cohort, ReceivedFigure] = {}
    for fig in f.figures:
        if fig.metric == gate.metric and fig.hardware_class == hardware_class:
            found[fig.cohort] = fig  # later figures replace earlier ones
    canary, baseline = found.get(Cohort.CANARY), found.get(Cohort.BASELINE)
    if canary is None or baseline is None:
        missing = " and ".join(c.value for c in Cohort if c not in found)
        return GateResult(
            gate=name,
            status=GateStatus.WAIT,
            detail=f"{hardware_class}: no {missing} figures for {gate.metric} since the wave began",
        )
    samples = min(canary.samples, baseline.samples)
    if samples < gate.min_samples:
        return GateResult(
            gate=name,
            status=GateStatus.WAIT,
            observed=canary.value,
            baseline=baseline.value,
            samples=samples,
            detail=f"{hardware_class}: {canary.samples} canary and {baseline.samples} baseline "
            f"samples of {gate.metric} (need {gate.min_samples} in each)",
        )
    if gate.better == "lower":
        limit = baseline.value * (1 + gate.tolerance) + gate.abs_tolerance
        ok = canary.value <= limit
    else:
        limit = baseline.value * (1 - gate.tolerance) - gate.abs_tolerance
        ok = canary.value >= limit
    return GateResult(
        gate=name,
        status=GateStatus.PASS if ok else GateStatus.FAIL,
        observed=canary.value,
        threshold=limit,
        baseline=baseline.value,
        samples=samples,
        detail=f"{hardware_class}: canary {gate.metric} {canary.value:g} vs baseline "
        f"{baseline.value:g} (limit {limit:g}, {gate.better} is better; {samples} samples)",
    )
