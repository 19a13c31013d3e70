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

Cost per tick: the rollout's device rows are never all read into Python. The versions the
baseline may run come from one GROUP BY over ``rollout_devices`` (a row per hardware class and
from-version), and each telemetry row is read with its device's rollout row beside it (a LEFT
JOIN on the primary key), filtered in SQL to the model and the versions that can count. The
membership rules live once, in ``cohort_of``; an inline state (every record in ``devices``: a
document from before rows existed, or a test's) is classified by the same function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from slmops.server.context import Context
from slmops.server.rollouts.machine import MetricSnapshot, RolloutState, RolloutStatus
from slmops.server.rollouts.machine.gates import Cohort, CohortFigure
from slmops.server.rollouts.service import run_event
from slmops.server.rollouts.store import TABLE as MEMBERS
from slmops.server.rollouts.store import records_of
from slmops.server.rollouts.tables import Rollout
from slmops.server.telemetry import aggregate
from slmops.server.telemetry.rows import load, spans
from slmops.server.telemetry.store import UNKNOWN_CLASS
from slmops.server.telemetry.tables import TelemetryHourlyRow, TelemetryWindowRow

log = logging.getLogger("slmops.server.telemetry")

Classifier = Callable[[str, str | None, str | None, str | None], Cohort | None]
"""(device_id, model, version, profile) -> the cohort the window counts for, or None."""

METRICS = ("error_rate", "latency_p95_ms", "ttft_p95_ms", "tokens_per_s", "logprob_mean")
Origins = dict[str, set[str]]
"""hardware class -> the versions the rollout's (not skipped) devices of it came from."""


class Member(Protocol):
    """What cohort membership reads of a device's rollout record (a ``DeviceRecord`` or the
    columns of its ``rollout_devices`` row)."""

    @property
    def hardware_class(self) -> str: ...
    @property
    def wave(self) -> int | None: ...
    @property
    def skipped(self) -> bool: ...
    @property
    def reverted_at(self) -> float | None: ...
    @property
    def from_version(self) -> str | None: ...


@dataclass(frozen=True)
class Joined:
    """A device's rollout row as read beside its telemetry (only the columns used here)."""

    hardware_class: str
    wave: int | None
    skipped: bool
    reverted_at: float | None
    from_version: str | None


def rollout_model(session: Session, rollout_id: str) -> str | None:
    row = session.get(Rollout, rollout_id)
    return row.model if row is not None and row.model else None


def origins_of(records: Iterable[Member]) -> Origins:
    out: Origins = {}
    for d in records:
        if d.from_version is not None and not d.skipped:
            out.setdefault(d.hardware_class, set()).add(d.from_version)
    return out


def origins_in_db(session: Session, rollout_id: str) -> Origins:
    """``origins_of`` the rollout's rows, as one GROUP BY: a row per (class, from-version)."""
    m = MEMBERS.c
    query = (
        select(m.hardware_class, m.from_version)
        .where(m.rollout_id == rollout_id, m.from_version.is_not(None), ~m.skipped)
        .group_by(m.hardware_class, m.from_version)
    )
    out: Origins = {}
    for hw, version in session.execute(query):
        out.setdefault(hw, set()).add(version)
    return out


def cohort_of(
    record: Member | None,
    origins: Origins,
    target: str,
    model: str | None,
    w_model: str | None,
    version: str | None,
    profile: str | None,
) -> Cohort | None:
    """The cohort a window of (model, version, profile) counts for, from the sending device's
    record in the rollout (None: not in it). The one statement of the module doc's rules."""
    if model is not None and w_model is not None and w_model != model:
        return None
    if record is not None:
        if record.skipped or record.reverted_at is not None:
            return None
        if (profile or UNKNOWN_CLASS) != record.hardware_class:
            return None  # delivered as another hardware class than the rollout matched
        if record.wave is not None:
            return Cohort.CANARY if version == target else None
        if version is not None and version == record.from_version:
            return Cohort.BASELINE
        return None
    if model is None or w_model is None or version is None:
        return None  # outside the rollout, only the same model counts
    if version in origins.get(profile or UNKNOWN_CLASS, set()):
        return Cohort.BASELINE
    return None


def classifier(state: RolloutState, model: str | None) -> Classifier:
    """Which cohort of ``state`` (every record in ``devices``) a window belongs to."""
    origins = origins_of(state.devices.values())

    def cohort(
        device_id: str, w_model: str | None, version: str | None, profile: str | None
    ) -> Cohort | None:
        record = state.devices.get(device_id)
        return cohort_of(record, origins, state.target_version, model, w_model, version, profile)

    return cohort


class RolloutCohorts:
    """``classifier`` for a stored rollout that reads only the rows of the devices it is asked
    about: ``prefetch`` them in chunks (the devices a query's telemetry names), the rest one by
    one on first sight. For views over telemetry (``query.summarize``), not per report."""

    def __init__(self, session: Session, row: Rollout) -> None:
        state = RolloutState.from_json(row.state_json)
        self.session, self.rollout_id = session, row.id
        self.target, self.model = state.target_version, row.model or None
        self.records: dict[str, Member] = dict(state.devices)
        self.complete = bool(state.devices)  # an inline document: every record is here
        if self.complete:
            self.origins = origins_of(state.devices.values())
        else:
            self.origins = origins_in_db(session, row.id)
        self.seen: set[str] = set()

    def prefetch(self, device_ids: Iterable[str]) -> None:
        missing = set(device_ids) - self.seen
        if self.complete or not missing:
            return
        self.records.update(records_of(self.session, self.rollout_id, missing))
        self.seen |= missing

    def __call__(
        self, device_id: str, w_model: str | None, version: str | None, profile: str | None
    ) -> Cohort | None:
        self.prefetch([device_id])
        record = self.records.get(device_id)
        return cohort_of(record, self.origins, self.target, self.model, w_model, version, profile)


def hardware_class_of(record: Member | None, profile: str | None) -> str:
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


Merged = dict[tuple[str, Cohort], aggregate.Acc]


def figures_for(
    session: Session, state: RolloutState, since: float, until: float | None = None
) -> list[CohortFigure]:
    """Canary and baseline figures per hardware class from telemetry in ``[since, until)``.

    ``state`` may be the summary alone (its devices are rows: read beside the telemetry, in
    SQL) or hold every record (classified in Python by the same rules)."""
    model = rollout_model(session, state.rollout_id)
    if state.devices:
        merged = _merge_inline(session, state, model, since, until)
    else:
        merged = _merge_joined(session, state, model, since, until)
    out: list[CohortFigure] = []
    for (hw, which), acc in sorted(merged.items()):
        for metric, (value, samples) in metric_values(acc).items():
            out.append(
                CohortFigure(
                    hardware_class=hw, cohort=which, metric=metric, value=value, samples=samples
                )
            )
    return out


def _add(merged: Merged, key: tuple[str, Cohort], acc: aggregate.Acc) -> None:
    merged[key] = aggregate.merge(merged.get(key) or aggregate.empty(), acc)


def _merge_inline(
    session: Session, state: RolloutState, model: str | None, since: float, until: float | None
) -> Merged:
    origins = origins_of(state.devices.values())
    versions = {state.target_version} | {
        d.from_version for d in state.devices.values() if d.from_version is not None
    }
    merged: Merged = {}
    for row in load(session, since=since, until=until):
        if row.version not in versions:
            continue
        record = state.devices.get(row.device_id)
        which = cohort_of(
            record, origins, state.target_version, model, row.model, row.version, row.profile
        )
        if which is not None:
            _add(merged, (hardware_class_of(record, row.profile), which), row.acc)
    return merged


def _merge_joined(
    session: Session, state: RolloutState, model: str | None, since: float, until: float | None
) -> Merged:
    origins = origins_in_db(session, state.rollout_id)
    versions = {state.target_version}.union(*origins.values())
    merged: Merged = {}
    for record, w_model, version, profile, acc in joined_rows(
        session, state.rollout_id, model, versions, since, until
    ):
        which = cohort_of(record, origins, state.target_version, model, w_model, version, profile)
        if which is not None:
            _add(merged, (hardware_class_of(record, profile), which), acc)
    return merged


JoinedRow = tuple[Joined | None, str | None, str | None, str | None, aggregate.Acc]


def joined_rows(
    session: Session,
    rollout_id: str,
    model: str | None,
    versions: set[str],
    since: float | None,
    until: float | None,
) -> Iterator[JoinedRow]:
    """Telemetry in ``[since, until)`` of ``model`` (or none named) at one of ``versions``,
    each with the sending device's row in the rollout (None: not in it): (record, model,
    version, profile, acc). One LEFT JOIN per span (``rows.spans``) on the rows' primary key."""
    m = MEMBERS.c
    for kind, lo, hi in spans(since, until):
        t: Any = TelemetryHourlyRow if kind == "hourly" else TelemetryWindowRow
        query = (
            select(
                t.model,
                t.version,
                t.profile,
                t.aggregate,
                m.device_id.label("member"),
                m.hardware_class,
                m.wave,
                m.skipped,
                m.reverted_at,
                m.from_version,
            )
            .select_from(t)
            .outerjoin(MEMBERS, and_(m.rollout_id == rollout_id, m.device_id == t.device_id))
            .where(t.version.in_(sorted(versions)))
        )
        if model is not None:
            query = query.where(or_(t.model == "", t.model == model))
        column = t.hour if kind == "hourly" else t.start_ts
        if lo is not None:
            query = query.where(column >= lo)
        if hi is not None:
            query = query.where(column < hi)
        for r in session.execute(query.execution_options(yield_per=1000)):
            record = None
            if r.member is not None:
                record = Joined(
                    r.hardware_class, r.wave, bool(r.skipped), r.reverted_at, r.from_version
                )
            acc = r.aggregate if kind == "hourly" else aggregate.from_window(r.aggregate)
            yield record, r.model or None, r.version or None, r.profile or None, acc


def has_metric_gates(state: RolloutState) -> bool:
    return bool(state.policy.gates.metrics) or any(
        w.gates is not None and w.gates.metrics for w in state.policy.waves
    )


def feed_metrics(session: Session, ctx: Context) -> int:
    """A ``MetricSnapshot`` to every running rollout with metric gates; returns how many were
    fed. A rollout that fails is logged and skipped. Reads each rollout's summary, never all
    its device rows (``figures_for`` joins them to the telemetry in SQL)."""
    fed = 0
    ids = list(
        session.scalars(select(Rollout.id).where(Rollout.status == RolloutStatus.RUNNING.value))
    )
    for rollout_id in ids:
        row = session.get(Rollout, rollout_id, populate_existing=True)
        if row is None:
            continue
        state = RolloutState.from_json(row.state_json)  # the summary: devices are rows
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
