"""POST /device/v1/checkin and /device/v1/actions: the agent reports, the server answers.

Every check-in records inventory, labels, last_seen, the active and previous models and the
action statuses, even when the answer is 304. Action statuses that name a rollout are fed to it
(each may advance, pause or roll back the rollout), and a device its blueprint's active rollout
does not know yet joins it (late enrollment). The desired state is then recomputed from the
governing blueprint and its rollout (``server/desired.py``) on every check-in rather than only
when something changed: it is a few small reads, and it cannot miss a change. It carries an ETag
computed from its canonical JSON on each request (nothing cached per process);
``If-None-Match`` with the current ETag gets 304 and no body, so an idle fleet polls cheaply.

``/actions`` takes only action statuses, answering 204: an agent posts its progress
(downloading, verifying, ...) while an install runs, so operators see it per rollout without
waiting for the next check-in, and the agent's ETag bookkeeping is not disturbed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.protocol.device import ActionReport, ActionStatus, CheckIn, DesiredState
from slmops.server.api.deps import DeviceDep, SessionDep, SettingsDep
from slmops.server.api.device.enroll import check_schema
from slmops.server.db.models import Device, DeviceAction, utcnow
from slmops.server.desired import Refresher, canonical, etag_of
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts import Context, join_if_matching, record_reports
from slmops.server.settings import ServerSettings

router = APIRouter(tags=["device"])


def desired_document(device: Device, *, poll_seconds: float) -> DesiredState:
    """The stored desired state, or "keep what runs" when there is none."""
    if device.desired:
        return DesiredState.model_validate(device.desired)
    return DesiredState(device_id=device.device_id, poll_seconds=poll_seconds)


def etag_matches(header: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison over a comma-separated If-None-Match list (or ``*``)."""
    if not header:
        return False
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def record_actions(session: Session, device_id: str, actions: list[ActionStatus]) -> None:
    now = utcnow()
    for status in actions:
        rollout_id = status.rollout_id or ""
        row = session.scalar(
            select(DeviceAction).where(
                DeviceAction.device_id == device_id,
                DeviceAction.rollout_id == rollout_id,
                DeviceAction.version == status.version,
            )
        )
        if row is None:
            row = DeviceAction(device_id=device_id, rollout_id=rollout_id, version=status.version)
            session.add(row)
        row.state = status.state.value
        row.stage = status.stage.value if status.stage else None
        row.detail = status.detail
        row.updated_at = now


def _context(settings: ServerSettings) -> Context:
    return Context(BlobStore(settings.data_dir), settings.poll_seconds)


def _reports(session: Session, device: Device, actions: list[ActionStatus], ctx: Context) -> None:
    """Store the statuses, then feed those naming a rollout to it (each commits)."""
    device_id = device.device_id
    record_actions(session, device_id, actions)
    session.commit()
    if any(a.rollout_id for a in actions):
        record_reports(session, device_id, actions, ctx)


@router.post(
    "/checkin",
    response_model=DesiredState,
    responses={304: {"description": "desired state unchanged since the If-None-Match ETag"}},
)
def check_in(
    body: CheckIn,
    device: DeviceDep,
    session: SessionDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    check_schema(body.schema_)
    inventory = body.inventory
    device.inventory = inventory.model_dump(mode="json")
    device.labels = dict(inventory.labels)
    device.profile = inventory.profile
    device.last_seen = utcnow()
    device.active = body.active.model_dump(mode="json") if body.active else None
    device.previous = body.previous.model_dump(mode="json") if body.previous else None
    ctx = _context(settings)
    if body.actions:
        _reports(session, device, body.actions, ctx)
    refresher = Refresher(session, ctx.store, poll_seconds=settings.poll_seconds)
    join_if_matching(refresher, device, ctx)  # reads no rollout through the refresher's cache
    refresher.refresh(device)
    doc = desired_document(device, poll_seconds=settings.poll_seconds)
    payload = canonical(doc)
    etag = etag_of(payload)
    if device.desired_etag != etag:
        device.desired_etag = etag
    session.commit()

    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(payload, media_type="application/json", headers=headers)


@router.post("/actions", status_code=204)
def report_actions(
    body: ActionReport, device: DeviceDep, session: SessionDep, settings: SettingsDep
) -> Response:
    """Progress of an install, between check-ins."""
    device.last_seen = utcnow()
    _reports(session, device, body.actions, _context(settings))
    return Response(status_code=204)
