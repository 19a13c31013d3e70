"""Reading telemetry for a time range: whole hours from the roll-up, edges from the windows.

A window belongs to a range when ``since <= window.start < until``. The hourly roll-up holds
every window by the hour its start falls in, so the hours entirely inside the range are read
from ``telemetry_hourly`` (one row per device-hour and dimensions) and only the partial hours at
either end from ``telemetry_windows``: the answer is exact and a long range stays cheap.
(Windows pruned by retention are gone from the edges; whole hours stay until the roll-up is
pruned.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from slmops.server.telemetry import aggregate
from slmops.server.telemetry.store import HOUR
from slmops.server.telemetry.tables import TelemetryHourlyRow, TelemetryWindowRow

COLUMNS = ("model", "version", "variant", "profile", "rollout_id", "adapter", "device_id")


@dataclass(frozen=True)
class Row:
    device_id: str
    model: str | None
    version: str | None
    variant: str | None
    profile: str | None
    rollout_id: str | None
    adapter: str | None
    acc: aggregate.Acc

    def dim(self, name: str) -> str | None:
        value: str | None = getattr(self, name)
        return value


def _none(value: str) -> str | None:
    return value or None


def _filters(table: Any, where: Mapping[str, str]) -> list[ColumnElement[bool]]:
    return [getattr(table, k) == v for k, v in where.items() if k in COLUMNS]


def load(
    session: Session,
    *,
    since: float | None,
    until: float | None,
    where: Mapping[str, str] | None = None,
) -> Iterator[Row]:
    """Every row of telemetry in ``[since, until)`` matching the column filters in ``where``
    (keys of ``COLUMNS``; other keys are the caller's to apply)."""
    where = where or {}
    for kind, lo, hi in spans(since, until):
        if kind == "windows":
            assert lo is not None and hi is not None  # spans() bounds every windows span
            yield from _windows(session, lo, hi, where)
            continue
        h = TelemetryHourlyRow
        query = select(h).where(*_filters(h, where))
        if lo is not None:
            query = query.where(h.hour >= lo)
        if hi is not None:
            query = query.where(h.hour < hi)
        for r in session.scalars(query.execution_options(yield_per=1000)):
            yield Row(
                r.device_id,
                _none(r.model),
                _none(r.version),
                _none(r.variant),
                _none(r.profile),
                _none(r.rollout_id),
                _none(r.adapter),
                r.aggregate,
            )


Span = tuple[Literal["hourly", "windows"], float | None, float | None]


def spans(since: float | None, until: float | None) -> list[Span]:
    """How ``[since, until)`` is read: whole hours from the roll-up (``hourly``, bounds on the
    ``hour`` column, None: open) and the partial hours at the edges from the windows
    (``windows``, bounds on ``start_ts``, always set). Shared by every reader of a range."""
    first = math.ceil(since / HOUR) * HOUR if since is not None else None
    last = math.floor(until / HOUR) * HOUR if until is not None else None
    if since is not None and until is not None and math.ceil(since / HOUR) >= until // HOUR:
        return [("windows", since, until)]
    out: list[Span] = [("hourly", first, last)]
    if since is not None and first is not None and since < first:
        out.append(("windows", since, first))
    if until is not None and last is not None and last < until:
        out.append(("windows", last, until))
    return out


def _windows(session: Session, lo: float, hi: float, where: Mapping[str, str]) -> Iterator[Row]:
    w = TelemetryWindowRow
    query = select(w).where(w.start_ts >= lo, w.start_ts < hi, *_filters(w, where))
    for r in session.scalars(query.execution_options(yield_per=1000)):
        yield Row(
            r.device_id,
            _none(r.model),
            _none(r.version),
            _none(r.variant),
            _none(r.profile),
            _none(r.rollout_id),
            _none(r.adapter),
            aggregate.from_window(r.aggregate),
        )
