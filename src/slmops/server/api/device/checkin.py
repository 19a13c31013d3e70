"""POST /device/v1/checkin and /device/v1/actions: the agent reports, the server answers.

A check-in records what changed since the last one (inventory, labels, active and previous
models; ``last_seen`` at most every half poll, up to 30 s), feeds action statuses that name a
rollout to it (each may advance, pause or roll back the rollout), lets a device its blueprint's
active rollout does not know yet join it (late enrollment), and recomputes the desired state
from the governing blueprint and its rollout (``server/desired.py``). The answer carries an ETag
of the desired state's canonical JSON; ``If-None-Match`` with the current ETag gets 304 and no
body. An idle poll (same body, same ETag) is answered from the per-process check-in cache
without touching the database (``checkin_cache.py``), which is what lets one node serve a large
fleet polling every minute; an idle full check-in writes nothing.

``/actions`` takes only action statuses, answering 204: an agent posts its progress
(downloading, verifying, ...) while an install runs, so operators see it per rollout without
waiting for the next check-in, and the agent's ETag bookkeeping is not disturbed.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.protocol.device import ActionReport, ActionStatus, CheckIn, DesiredState
from slmops.server.api.deps import (
    UNKNOWN_DEVICE,
    DeviceDep,
    SessionDep,
    device_secret,
    unauthorized,
)
from slmops.server.api.device.checkin_cache import CheckinCache, Entry
from slmops.server.api.device.enroll import check_schema
from slmops.server.db.models import Device, DeviceAction, as_utc, utcnow
from slmops.server.db.session import Database
from slmops.server.desired import CHANGES, Refresher, canonical, etag_of
from slmops.server.errors import api_error
from slmops.server.openapi import DEVICE_SECURITY, errors, json_body
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts import Context, join_if_matching, record_reports
from slmops.server.security import TokenKind, hash_secret
from slmops.server.settings import ServerSettings

router = APIRouter(tags=["device"])
MAX_BODY_BYTES = 256 * 1024


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


def _context(app: Any) -> Context:
    """The rollout context, with one BlobStore per app (creating one stats its folders)."""
    settings: ServerSettings = app.state.settings
    store = getattr(app.state, "blob_store", None)
    if store is None:
        store = app.state.blob_store = BlobStore(settings.data_dir)
    return Context(store, settings.poll_seconds)


def _reports(session: Session, device: Device, actions: list[ActionStatus], ctx: Context) -> None:
    """Store the statuses, then feed those naming a rollout to it (each commits)."""
    device_id = device.device_id
    record_actions(session, device_id, actions)
    session.commit()
    if any(a.rollout_id for a in actions):
        record_reports(session, device_id, actions, ctx)


def _same(stored: object, new: object) -> bool:
    return stored == new


def _seen_every(settings: ServerSettings) -> float:
    """How stale ``last_seen`` may get before an idle check-in writes it: half a poll, at most
    30 s (the dashboard calls a device stale after three missed polls)."""
    return min(30.0, settings.poll_seconds / 2)


def _parse(raw: bytes) -> CheckIn:
    try:
        return CheckIn.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors) from None


def _full_checkin(
    app: Any, key: str, secret: str, raw: bytes, if_none_match: str | None, now: float
) -> Response:
    """The full path: authenticate, record what changed, feed reports, recompute, answer."""
    settings: ServerSettings = app.state.settings
    body = _parse(raw)
    check_schema(body.schema_)
    db: Database = app.state.db
    with db.sessions() as session:
        device = session.scalar(select(Device).where(Device.credential_hash == key))
        if device is None:
            raise unauthorized(*UNKNOWN_DEVICE)
        inventory = body.inventory.model_dump(mode="json")
        active = body.active.model_dump(mode="json") if body.active else None
        previous = body.previous.model_dump(mode="json") if body.previous else None
        # assign only what changed, so an idle check-in writes nothing but (rarely) last_seen
        if not _same(device.inventory, inventory):
            device.inventory = inventory
        if not _same(device.labels, dict(body.inventory.labels)):
            device.labels = dict(body.inventory.labels)
        if device.profile != body.inventory.profile:
            device.profile = body.inventory.profile
        if not _same(device.active, active):
            device.active = active
        if not _same(device.previous, previous):
            device.previous = previous
        seen = as_utc(device.last_seen).timestamp() if device.last_seen else 0.0
        if now - seen >= _seen_every(settings):
            device.last_seen = utcnow()
            seen = now
        ctx = _context(app)
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
        session.commit()  # cheap when nothing was written (queries autoflush, so always)
        device_id = device.device_id
    cache: CheckinCache = app.state.checkin_cache
    if not body.actions:
        cache.put(
            key,
            Entry(
                device_id=device_id,
                etag=etag,
                body_digest=hashlib.sha256(raw).digest(),
                seen_at=seen,
                changes=CHANGES[0],
                expires=now + cache.ttl,
            ),
        )
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(payload, media_type="application/json", headers=headers)


@router.post(
    "/checkin",
    response_model=DesiredState,
    responses={
        304: {"description": "desired state unchanged since the If-None-Match ETag"},
        **errors(400),
    },
    openapi_extra=json_body(CheckIn) | DEVICE_SECURITY,
)
async def check_in(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Idle polls are answered from the check-in cache in the event loop; the rest run the
    full path on a worker thread."""
    secret = device_secret(authorization)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise api_error(
            413, "too_large", f"check-in body over {MAX_BODY_BYTES} bytes", where="body"
        )
    key = hash_secret(secret, TokenKind.DEVICE)
    now = time.time()
    app = request.app
    settings: ServerSettings = app.state.settings
    cache: CheckinCache = app.state.checkin_cache
    digest = hashlib.sha256(raw).digest()
    etag = (if_none_match or "").strip().removeprefix("W/") or None
    if cache.hit(key, digest, etag, now, _seen_every(settings)):
        return Response(status_code=304, headers={"ETag": etag or "", "Cache-Control": "no-cache"})
    return await run_in_threadpool(_full_checkin, app, key, secret, raw, if_none_match, now)


@router.post("/actions", status_code=204)
def report_actions(
    body: ActionReport, device: DeviceDep, session: SessionDep, request: Request
) -> Response:
    """Progress of an install, between check-ins."""
    device.last_seen = utcnow()
    _reports(session, device, body.actions, _context(request.app))
    return Response(status_code=204)
