"""Operator API: GET /api/v1/telemetry (grouped, merged figures) and /api/v1/alerts.

``/telemetry?group_by=version&group_by=label:site&since=...&until=...&where=profile=rpi5``
answers ``{"data": [...], "count": n}`` with the dicts ``query.summarize`` documents (viewer
role). ``where`` is repeated ``key=value``. Alerts are listed newest first (viewer) and
acknowledged by an operator (``POST /api/v1/alerts/{id}/ack``), which lets drift detection
raise the same alert again if the shift persists.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from slmops.server.api.deps import IdPath, OperatorDep, SessionDep, ViewerDep
from slmops.server.errors import api_error
from slmops.server.openapi import errors
from slmops.server.telemetry.query import summarize
from slmops.server.telemetry.schemas import AlertList, AlertPublic, TelemetrySummary
from slmops.server.telemetry.tables import AlertRow

router = APIRouter(tags=["telemetry"])


@router.get("/telemetry", response_model=TelemetrySummary)
async def read_telemetry(
    session: SessionDep,
    _token: ViewerDep,
    group_by: Annotated[list[str] | None, Query()] = None,
    since: float | None = None,
    until: float | None = None,
    where: Annotated[list[str] | None, Query(description="key=value, repeatable")] = None,
) -> TelemetrySummary:
    """Telemetry merged per group over ``[since, until)`` (epoch seconds)."""
    filters: dict[str, str] = {}
    for item in where or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise api_error(
                422, "invalid_request", f"where {item!r} is not key=value", where="where"
            )
        filters[key] = value
    rows = await run_in_threadpool(
        summarize, session, group_by=list(group_by or []), since=since, until=until, where=filters
    )
    return TelemetrySummary(data=rows, count=len(rows))


def _public(row: AlertRow) -> AlertPublic:
    return AlertPublic.model_validate(row, from_attributes=True)


@router.get("/alerts", response_model=AlertList)
def read_alerts(
    session: SessionDep,
    _token: ViewerDep,
    acknowledged: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AlertList:
    """Drift and regression alerts, newest first."""
    query = select(AlertRow).order_by(AlertRow.created_at.desc(), AlertRow.id.desc())
    if acknowledged is not None:
        query = query.where(AlertRow.acknowledged.is_(acknowledged))
    rows = [_public(r) for r in session.scalars(query.limit(limit))]
    return AlertList(data=rows, count=len(rows))


@router.post("/alerts/{alert_id}/ack", response_model=AlertPublic, responses=errors(404))
def acknowledge_alert(session: SessionDep, _token: OperatorDep, alert_id: IdPath) -> AlertPublic:
    row = session.get(AlertRow, alert_id)
    if row is None:
        raise api_error(404, "not_found", f"no alert {alert_id}", where="alert_id")
    row.acknowledged = True
    session.commit()
    return _public(row)
