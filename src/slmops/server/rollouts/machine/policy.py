"""Rollout policy: how many devices each wave moves, and what a wave must show before the next.

A policy is user input (YAML in a blueprint or an API body), so it is validated up front with
errors that say which wave and which key is wrong, rather than failing halfway through a rollout.

Waves are *cumulative* targets: ``[{percent: 1}, {percent: 10}, {percent: 50}, {percent: 100}]``
(the default) means "1% of the devices by the end of wave 0, 10% by the end of wave 1", and so on.
Percentages round up, so the first default wave is max(1 device, 1%). Counts are absolute
(``{count: 5}``, capped at the number of devices). The last wave must be ``{percent: 100}`` so that
a rollout that succeeds has moved every device its selector matched.

Gates are set once for all waves (``gates``) and may be overridden per wave (``waves[i].gates``,
only the keys given), so a canary can soak longer than the later waves without restating the rest.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from slmops.server.rollouts.machine.status import RolloutModel

MAX_WAVES = 100


class FailureAction(StrEnum):
    """What the rollout does by itself when a wave fails its gates or times out."""

    PAUSE = "pause"
    ROLLBACK = "rollback"


class MetricGate(RolloutModel):
    """Canary cohort vs baseline cohort on the same hardware class, for one telemetry metric.

    The limit is ``baseline * (1 + tolerance) + abs_tolerance`` when lower is better (error rate,
    p95 latency) and ``baseline * (1 - tolerance) - abs_tolerance`` when higher is better
    (tokens/s, a quality proxy). ``abs_tolerance`` exists because a relative tolerance on a baseline
    of 0 (no errors at all) would fail the canary on its first error.
    """

    metric: str = Field(min_length=1, description="e.g. error_rate, latency_p95_ms, tokens_per_s")
    better: Literal["lower", "higher"]
    tolerance: float = Field(
        0.1, ge=0, strict=True, description="relative slack against the baseline"
    )
    abs_tolerance: float = Field(
        0.0, ge=0, strict=True, description="absolute slack, in the metric's unit"
    )
    min_samples: int = Field(
        100, ge=1, le=1 << 40, strict=True, description="in each cohort, per hardware class"
    )


class WaveGates(RolloutModel):
    """Conditions for a wave to pass, and the actions taken when it fails or cannot decide.

    Device counts are over the devices assigned *in this wave*: a wave is judged by the devices it
    moved (earlier waves were judged already, and an operator may have promoted past them).
    """

    min_reported: float = Field(
        0.9, ge=0, le=1, strict=True, description="fraction of the wave's devices in a final state"
    )
    min_success_rate: float = Field(
        0.95, ge=0, le=1, strict=True, description="active / devices in a final state"
    )
    max_health_failures: int | None = Field(
        None,
        ge=0,
        le=1 << 40,
        strict=True,
        description="health-check failures allowed (a count); null: no count limit",
    )
    max_health_failure_rate: float | None = Field(
        0.05,
        ge=0,
        le=1,
        strict=True,
        description="health-check failures allowed as a fraction of the wave; null: no limit",
    )
    min_soak_seconds: float = Field(
        600.0, ge=0, strict=True, description="time from wave start to passing"
    )
    timeout_seconds: float = Field(
        86400.0,
        gt=0,
        strict=True,
        description="time without a decision before on_timeout (restarts on resume)",
    )
    metrics: list[MetricGate] = Field(default_factory=list)
    on_failure: FailureAction = FailureAction.ROLLBACK
    on_timeout: FailureAction = FailureAction.PAUSE

    @model_validator(mode="after")
    def _timeout_after_soak(self) -> Self:
        if self.timeout_seconds <= self.min_soak_seconds:
            raise ValueError(
                f"timeout_seconds ({self.timeout_seconds:g}) must be longer than min_soak_seconds "
                f"({self.min_soak_seconds:g}): the wave would time out before it could pass"
            )
        return self


class GateOverrides(RolloutModel):
    """Per-wave changes to the policy's gates: only the keys given replace the policy's values."""

    min_reported: float | None = Field(None, ge=0, le=1, strict=True)
    min_success_rate: float | None = Field(None, ge=0, le=1, strict=True)
    max_health_failures: int | None = Field(None, ge=0, le=1 << 40, strict=True)
    max_health_failure_rate: float | None = Field(None, ge=0, le=1)
    min_soak_seconds: float | None = Field(None, ge=0, strict=True)
    timeout_seconds: float | None = Field(None, gt=0, strict=True)
    metrics: list[MetricGate] | None = None
    on_failure: FailureAction | None = None
    on_timeout: FailureAction | None = None

    def apply_to(self, base: WaveGates) -> WaveGates:
        """The base gates with these overrides, validated together (e.g. timeout vs soak)."""
        data: dict[str, Any] = base.model_dump()
        data.update(self.model_dump(exclude_none=True))
        return WaveGates.model_validate(data)


class WaveStep(RolloutModel):
    """One wave's cumulative target: ``percent`` of the devices or an absolute ``count``."""

    percent: float | None = Field(None, gt=0, le=100, strict=True)
    count: int | None = Field(None, ge=1, le=1 << 40, strict=True)
    gates: GateOverrides | None = None

    @model_validator(mode="after")
    def _exactly_one_size(self) -> Self:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a wave has exactly one of 'percent' or 'count'")
        return self

    def describe(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        return f"{self.count} device{'s' if self.count != 1 else ''}"


def _default_waves() -> list[WaveStep]:
    return [WaveStep(percent=p) for p in (1, 10, 50, 100)]


class RolloutPolicy(RolloutModel):
    """Waves, their gates, and whether passing waves advance by themselves."""

    waves: list[WaveStep] = Field(default_factory=_default_waves, min_length=1)
    gates: WaveGates = Field(default_factory=WaveGates)
    auto_advance: bool = Field(
        True, description="false: a wave that passes waits for an operator's promote"
    )
    start: Literal["auto", "manual"] = Field(
        "auto",
        description="auto: the rollout an apply creates starts at once; manual: it waits for "
        "an operator's start",
    )

    @model_validator(mode="after")
    def _waves_make_sense(self) -> Self:
        if len(self.waves) > MAX_WAVES:
            raise ValueError(f"at most {MAX_WAVES} waves, got {len(self.waves)}")
        last_percent: float | None = None
        last_count: int | None = None
        for i, step in enumerate(self.waves):
            if step.percent is not None:
                if last_percent is not None and step.percent <= last_percent:
                    raise ValueError(
                        f"wave {i} ({step.describe()}) does not grow: waves are cumulative, so "
                        f"each percent must be larger than the one before ({last_percent:g}%)"
                    )
                last_percent = step.percent
            elif step.count is not None:
                if last_count is not None and step.count <= last_count:
                    raise ValueError(
                        f"wave {i} ({step.describe()}) does not grow: waves are cumulative, so "
                        f"each count must be larger than the one before ({last_count})"
                    )
                last_count = step.count
            if step.gates is not None:
                try:
                    step.gates.apply_to(self.gates)
                except ValueError as exc:
                    raise ValueError(f"wave {i} gates: {_first_message(exc)}") from None
        if self.waves[-1].percent != 100:
            raise ValueError(
                f"the last wave must be {{percent: 100}} (got {self.waves[-1].describe()}), "
                "so that a rollout that succeeds has moved every matched device"
            )
        return self

    def gates_for(self, wave: int) -> WaveGates:
        """The gates that apply to wave ``wave``: the policy's, with that wave's overrides."""
        overrides = self.waves[wave].gates
        return self.gates if overrides is None else overrides.apply_to(self.gates)


def _first_message(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return str(first.get("msg", exc)).removeprefix("Value error, ")
    return str(exc)
