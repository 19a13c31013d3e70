"""Canary and baseline cohorts of a rollout, and the figures its metric gates compare.

Per hardware class:

- **canary**: devices the rollout moved (``wave`` set, not reverted, not skipped), counting only
  their windows on the rollout's target version;
- **baseline**: devices of that class the rollout matched but has not moved (queued), on the
  version they had when matched (``from_version``), plus devices of the class *outside* the
  rollout running the same model at one of the versions the rollout's devices of that class came
  from. Those run the same model and version on the same hardware at the same time, which is what
  a baseline is for; and without them the last wave (100%) would have no baseline at all.
  Devices reverted or skipped belong to neither cohort, and so do windows a rollout device
  delivered as another hardware class than the one the rollout matched it in (a device cannot
  move its figures into another class's comparison by changing its reported profile).

Figures (``CohortFigure``), named as ``MetricGate.metric`` names them: ``error_rate``,
``latency_p95_ms``, ``ttft_p95_ms``, ``tokens_per_s`` (samples: requests) and ``logprob_mean``
(samples: tokens behind it). A metric without data in a cohort is left out (its gate waits).

``feed_metrics`` sends one ``MetricSnapshot`` to every running rollout whose policy has metric
gates, from the start of its current wave (gates ignore older figures anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.server.db.models import Rollout
from slmops.server.rollout import MetricSnapshot, RolloutState, RolloutStatus
from slmops.server.rollout.gates import Cohort, CohortFigure
from slmops.server.rollouts import Context, run_event
from slmops.server.telemetry import aggregate
from slmops.server.telemetry.rows import load
from slmops.server.telemetry.store import UNKNOWN_CLASS

log = logging.getLogger("slmops.server.telemetry")

Classifier = Callable[[str, str | None, str | None, str | None], Cohort | None]
"""(device_id, model, version, profile) -> the cohort the window counts for, or None."""

METRICS = ("error_rate", "latency_p95_ms", "ttft_p95_ms", "tokens_per_s", "logprob_mean")


def rollout_model(session: Session, rollout_id: str) -> str | None:
    row = session.get(Rollout, rollout_id)
    return row.model if row is not None and row.model else None


def classifier(state: RolloutState, model: str | None) -> Classifier:
    """Which cohort of ``state`` a window of (device, model, version, profile) belongs to."""
    origins: dict[str, set[str]] = {}
    for d in state.devices.values():
        if d.from_version is not None and not d.skipped:
            origins.setdefault(d.hardware_class, set()).add(d.from_version)

    def cohort(
        device_id: str, w_model: str | None, version: str | None, profile: str | None
    ) -> Cohort | None:
        if model is not None and w_model is not None and w_model != model:
            return None
        record = state.devices.get(device_id)
        if record is not None:
            if record.skipped or record.reverted_at is not None:
                return None
            if (profile or UNKNOWN_CLASS) != record.hardware_class:
                return None  # delivered as another hardware class than the rollout matched
            if record.wave is not None:
                return Cohort.CANARY if version == state.target_version else None
            if version is not None and version == record.from_version:
                return Cohort.BASELINE
            return None
        if model is None or w_model is None or version is None:
            return None  # outside the rollout, only the same model counts
        if version in origins.get(profile or UNKNOWN_CLASS, set()):
            return Cohort.BASELINE
        return None

    return cohort


def hardware_class_of(state: RolloutState, device_id: str, profile: str | None) -> str:
    record = state.devices.get(device_id)
    return record.hardware_class if record is not None else (profile or UNKNOWN_CLASS)


def metric_values(acc: aggregate.Acc) -> dict[str, tuple[float, int]]:
    """The gate metrics of one cohort's merged telemetry: name -> (value, samples)."""
    fig = aggregate.figures(acc)
    requests = round(acc["requests"])
    out: dict[str, tuple[float, int]] = {}
    for name in ("error_rate", "latency_p95_ms", "ttft_p95_ms", "tokens_per_s"):
        if fig[name] is not None:
            out[name] = (float(fig[name]), requests)
    if fig["logprob_mean"] is not None:
        out["logprob_mean"] = (float(fig["logprob_mean"]), round(acc["quality_tokens"]))
    return out


def figures_for(
    session: Session, state: RolloutState, since: float, until: float | None = None
) -> list[CohortFigure]:
    """Canary and baseline figures per hardware class from telemetry in ``[since, until)``."""
    model = rollout_model(session, state.rollout_id)
    cohort = classifier(state, model)
    versions = {state.target_version} | {
        d.from_version for d in state.devices.values() if d.from_version is not None
    }
    merged: dict[tuple[str, Cohort], aggregate.Acc] = {}
    for row in load(session, since=since, until=until):
        if row.version not in versions:
            continue
        which = cohort(row.device_id, row.model, row.version, row.profile)
        if which is None:
            continue
        key = (hardware_class_of(state, row.device_id, row.profile), which)
        merged[key] = aggregate.merge(merged.get(key) or aggregate.empty(), row.acc)
    out: list[CohortFigure] = []
    for (hw, which), acc in sorted(merged.items()):
        for metric, (value, samples) in metric_values(acc).items():
            out.append(
                CohortFigure(
                    hardware_class=hw, cohort=which, metric=metric, value=value, samples=samples
                )
            )
    return out


def has_metric_gates(state: RolloutState) -> bool:
    return bool(state.policy.gates.metrics) or any(
        w.gates is not None and w.gates.metrics for w in state.policy.waves
    )


def feed_metrics(session: Session, ctx: Context) -> int:
    """A ``MetricSnapshot`` to every running rollout with metric gates; returns how many were
    fed. A rollout that fails is logged and skipped."""
    fed = 0
    ids = list(
        session.scalars(select(Rollout.id).where(Rollout.status == RolloutStatus.RUNNING.value))
    )
    for rollout_id in ids:
        row = session.get(Rollout, rollout_id, populate_existing=True)
        if row is None:
            continue
        state = RolloutState.from_json(row.state_json)
        if state.status is not RolloutStatus.RUNNING or not has_metric_gates(state):
            continue
        since = state.waves[-1].started_at if state.waves else state.created_at
        try:
            figures = figures_for(session, state, since)
            if figures:
                run_event(session, rollout_id, MetricSnapshot(figures=figures), ctx)
                fed += 1
        except Exception:
            session.rollback()
            log.exception("rollout %s: feeding telemetry figures failed", rollout_id)
    session.commit()
    return fed
