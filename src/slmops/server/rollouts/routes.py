"""Rollouts as operators see and steer them, under /api/v1/rollouts.

Rollouts are created by blueprint applies and channel moves (``server/reconcile.reconcile``);
here they are listed, read (waves with the gate results that decided them and their counts, one
page of devices with their last reported action state, the audit history) and steered: start,
pause, resume, promote, abort, rollback. Every view carries the counts from the rollout's tally
(no device row read for them); devices come a page at a time (``limit``, default 100, at most
1000; ``after``: the cursor, a device id; ``wave=`` and ``status=`` filters), so a view of a
100k-device rollout costs one indexed read of one page. A command the rollout's state does not allow answers 409 with the states that
would allow it; ``wave`` in the body guards against promoting twice from a stale view.
"""

from __future__ import annotations

from typing import Literal, get_args

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from slmops.server.api.deps import OperatorDep, ServicesDep, SessionDep, ViewerDep
from slmops.server.db.models import as_utc
from slmops.server.errors import api_error
from slmops.server.openapi import errors
from slmops.server.rollouts.machine import (
    InvalidTransition,
    OperatorAction,
    OperatorCommand,
    RolloutState,
)
from slmops.server.rollouts.schemas import (
    ActionBody,
    DeviceInRollout,
    DevicePage,
    RolloutDetail,
    RolloutList,
    RolloutSummary,
    WavePublic,
)
from slmops.server.rollouts.service import run_event
from slmops.server.rollouts.store import page
from slmops.server.rollouts.tables import Rollout

router = APIRouter(prefix="/rollouts", tags=["rollouts"])


DEFAULT_LIMIT = 100
CURSOR = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a device id (protocol/device.py)
MAX_LIMIT = 1000
DeviceStatus = Literal[
    "queued",
    "skipped",
    "unplaceable",
    "scheduled",
    "downloading",
    "verifying",
    "installing",
    "health-checking",
    "active",
    "failed",
    "rolled-back",
]
"""``DeviceRecord.status``: queued, skipped, unplaceable, or the last reported action state."""
DEVICE_STATUSES: tuple[str, ...] = get_args(DeviceStatus)


def summary(row: Rollout, state: RolloutState) -> RolloutSummary:
    """From the summary's tally: no device row is read."""
    t = state.tally
    return RolloutSummary(
        id=row.id,
        blueprint=row.blueprint,
        model=row.model,
        target_version=state.target_version,
        adapters=state.adapters,
        status=state.status.value,
        wave=state.wave,
        waves=len(state.policy.waves),
        devices=t.total,
        matched=t.matched,
        by_status=dict(sorted(t.statuses.items())),
        unplaceable=dict(sorted(t.unplaceable.items())),
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


def detail(
    row: Rollout,
    *,
    limit: int = DEFAULT_LIMIT,
    after: str | None = None,
    wave: int | None = None,
    status: str | None = None,
) -> RolloutDetail:
    """The summary, waves (with their counts) and history, and one page of devices: the
    counts come from the tally, the page from one indexed read (``store.page``)."""
    session = object_session(row)
    if session is None:
        raise RuntimeError(f"rollout {row.id} is not attached to a session")
    state = RolloutState.from_json(row.state_json)
    records, cursor = page(session, row, limit=limit, after=after, wave=wave, status=status)
    targets = state.targets()
    waves: list[WavePublic] = []
    for i, step in enumerate(state.policy.waves):
        rec = state.waves[i] if i < len(state.waves) else None
        counts = state.tally.wave(i)
        waves.append(
            WavePublic(
                index=i,
                target=targets[i],
                size=step.describe(),
                started_at=rec.started_at if rec else None,
                ended_at=rec.ended_at if rec else None,
                outcome=rec.outcome.value if rec and rec.outcome else None,
                ended_by=rec.ended_by if rec else None,
                devices=counts.devices,
                reported=counts.reported,
                succeeded=counts.succeeded,
                health_failures=counts.health_failures,
                evaluation=rec.evaluation if rec else None,
                decision=rec.decision if rec else None,
            )
        )
    devices = [
        DeviceInRollout(
            device_id=device_id,
            hardware_class=d.hardware_class,
            from_version=d.from_version,
            wave=d.wave,
            status=d.status,
            failed_stage=d.failed_stage.value if d.failed_stage else None,
            detail=d.unplaceable if d.status == "unplaceable" else d.detail,
            reported_at=d.reported_at,
        )
        for device_id, d in records
    ]
    return RolloutDetail(
        **summary(row, state).model_dump(),
        policy=state.policy.model_dump(mode="json"),
        wave_list=waves,
        device_list=devices,
        device_page=DevicePage(
            limit=limit, after=after, wave=wave, status=status, returned=len(devices), next=cursor
        ),
        history=state.history,
    )


def _get_or_404(session: Session, rollout_id: str) -> Rollout:
    row = session.get(Rollout, rollout_id)
    if row is None:
        raise api_error(
            404,
            "not_found",
            f"no rollout {rollout_id!r}",
            where="rollout_id",
            hint="list them with GET /api/v1/rollouts (slmops rollout list)",
        )
    return row


@router.get("")
def read_rollouts(
    session: SessionDep,
    _caller: ViewerDep,
    blueprint: str | None = Query(None, description="only this blueprint's rollouts"),
    status: str | None = Query(None, description="only rollouts in this status"),
) -> RolloutList:
    query = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.seq.desc())
    if blueprint:
        query = query.where(Rollout.blueprint == blueprint)
    if status:
        query = query.where(Rollout.status == status)
    rows = session.scalars(query.limit(500))
    return RolloutList(data=[summary(r, RolloutState.from_json(r.state_json)) for r in rows])


@router.get("/{rollout_id}", responses=errors(404))
def read_rollout(
    rollout_id: str,
    session: SessionDep,
    _caller: ViewerDep,
    limit: int = Query(
        DEFAULT_LIMIT, ge=0, le=MAX_LIMIT, description="devices per page (0: counts only)"
    ),
    after: str | None = Query(
        None,
        pattern=CURSOR,
        description="cursor: the `device_page.next` of the previous page (a device id)",
    ),
    wave: int | None = Query(None, ge=0, le=1 << 20, description="only devices this wave moved"),
    status: DeviceStatus | None = Query(None, description="only devices with this status"),
) -> RolloutDetail:
    """The rollout's counts, waves and history, and one page of its devices in id order."""
    row = _get_or_404(session, rollout_id)
    return detail(row, limit=limit, after=after, wave=wave, status=status)


@router.post("/{rollout_id}/{action}", responses=errors(404, 409))
def act_on_rollout(
    rollout_id: str,
    action: OperatorAction,
    session: SessionDep,
    services: ServicesDep,
    caller: OperatorDep,
    body: ActionBody | None = None,
) -> RolloutDetail:
    """start, pause, resume, promote, abort or rollback; 409 when the state does not allow it."""
    _get_or_404(session, rollout_id)
    body = body or ActionBody()
    command = OperatorCommand(action=action, actor=caller.name, reason=body.reason, wave=body.wave)
    ctx = services.context()
    try:
        run_event(session, rollout_id, command, ctx)
    except InvalidTransition as exc:
        raise api_error(
            409, "invalid_transition", exc.message, where=exc.where, hint=exc.hint
        ) from None
    return detail(_get_or_404(session, rollout_id))
