"""POST /device/v1/checkin and /device/v1/actions: the agent reports, the server answers.

The protocol is in ``server/checkin.py`` (service functions); this module picks the cheapest
path that gives the same answer:

1. the check-in cache (``checkin_cache.py``): an idle poll whose credential, body bytes and
   ETag were seen in the last full answer gets 304 from memory, in the event loop; such a poll
   is normally answered before routing by ``fast_checkin.py`` (same test, ``cache_says_304``),
   and reaches this route only on a miss;
2. the idle path: the device row is read in a batch with other check-ins
   (``server/checkin_reader.py``); when the device reports what its row holds, the stored
   desired state is the answer (``checkin.idle_answer``), with ``last_seen`` buffered;
3. the full path on a worker thread (``checkin.record_checkin``).

Each request hashes its credential and its body once: when ``fast_checkin.py`` looked first
(a poll with ``If-None-Match``) and missed, it leaves both in the ASGI scope's state
(``Computed``) and the route takes them from there; without that layer, or for a request it
did not look at, the route computes them itself.

The answer carries an ETag of the desired state's canonical JSON; ``If-None-Match`` with the
current ETag gets 304 and no body. ``/actions`` takes only action statuses, answering 204: an
agent posts its progress (downloading, verifying, ...) while an install runs, so operators see
it per rollout without waiting for the next check-in, and the agent's ETag bookkeeping is not
disturbed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import select

from slmops.protocol.device import ActionReport, CheckIn, DesiredState
from slmops.server.action_reports import report_actions as report_actions_of
from slmops.server.api.deps import (
    UNKNOWN_DEVICE,
    DeviceDep,
    SessionDep,
    device_secret,
    unauthorized,
)
from slmops.server.api.device.checkin_cache import CheckinCache, Entry
from slmops.server.api.device.enroll import check_schema
from slmops.server.checkin import (
    Answer,
    etag_matches,
    idle_answer,
    parse,
    record_checkin,
    seen_every,
)
from slmops.server.checkin_reader import CheckinReader
from slmops.server.context import Context, Services
from slmops.server.db.models import Device
from slmops.server.db.session import Database
from slmops.server.errors import api_error
from slmops.server.invalidation import own_drops
from slmops.server.openapi import DEVICE_SECURITY, errors, json_body
from slmops.server.security import TokenKind, hash_secret
from slmops.server.settings import ServerSettings

router = APIRouter(tags=["device"])
MAX_BODY_BYTES = 256 * 1024
STATE_KEY = "slmops_checkin"  # the request state's name for ``Computed``
__all__ = ["etag_matches", "router"]


@dataclass(frozen=True)
class Computed:
    """What ``fast_checkin.py`` computed for a request it then handed on (``STATE_KEY`` in
    the scope's state), so the route does not hash the credential and the body again.
    ``authorization`` and ``size`` say what they were computed from: the route uses them only
    for the same header and a body of the same length (the layer replays the bytes it read)."""

    authorization: str
    key: str
    size: int
    digest: bytes | None  # None: the body was not read whole (over the limit, cut short)


def _context(app: Any) -> Context:
    """The use-case context from the app's services (one blob store and target cache)."""
    services: Services = app.state.services
    return services.context()


def _parse(raw: bytes) -> CheckIn:
    try:
        body = parse(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors) from None
    check_schema(body.schema_)
    return body


def _full(app: Any, key: str, body: CheckIn, now: float) -> tuple[Answer, int]:
    """The full check-in, and how many invalidations its own commits caused in this process
    (``own_drops``): its answer already reflects them, so they must not keep it out of the
    check-in cache (they used to, and a device was cached only from its second poll)."""
    db: Database = app.state.db
    with db.sessions() as session:
        device = session.scalar(select(Device).where(Device.credential_hash == key))
        if device is None:
            raise unauthorized(*UNKNOWN_DEVICE)
        result = record_checkin(session, device, body, _context(app), now=now)
        return result, own_drops(session)


def credential_key(authorization: str | None) -> str:
    """The cache and database key of a device's Authorization header (401 when malformed)."""
    return hash_secret(device_secret(authorization), TokenKind.DEVICE)


def body_digest(raw: bytes) -> bytes:
    """The check-in cache's key for the body bytes (both callers hash through here)."""
    return hashlib.sha256(raw).digest()


def sent_etag(if_none_match: str | None) -> str:
    """The ETag a cache hit echoes: the caller's own, trimmed, without a weak ``W/`` prefix."""
    return (if_none_match or "").strip().removeprefix("W/")


def cache_says_304(
    state: Any, key: str, digest: bytes, if_none_match: str | None, now: float, *, count_miss: bool
) -> bool:
    """True when the check-in cache answers 304: the credential (``key``), the body's sha256
    (``digest``) and the ETag are those of this device's last full answer, still fresh. One
    test for both callers (this route and ``fast_checkin.py``), so they cannot disagree."""
    settings: ServerSettings = state.settings
    cache: CheckinCache = state.checkin_cache
    etag = sent_etag(if_none_match) or None
    every = seen_every(settings.poll_seconds)
    reader: CheckinReader | None = getattr(state, "checkin_reader", None)
    seen = reader.seen if reader is not None else None
    return cache.hit(key, digest, etag, now, every, count_miss=count_miss, seen=seen)


async def answer(
    app: Any, key: str, raw: bytes, if_none_match: str | None, digest: bytes | None = None
) -> Answer | None:
    """The check-in's answer; None when the cache says 304 (the caller's ETag is current).
    ``digest``: the body's, when the caller has it already (``Computed``)."""
    now = time.time()
    settings: ServerSettings = app.state.settings
    cache: CheckinCache = app.state.checkin_cache
    if digest is None:
        digest = body_digest(raw)
    if cache_says_304(app.state, key, digest, if_none_match, now, count_miss=True):
        return None
    body = _parse(raw)
    epoch = cache.epoch  # before the read: an invalidation meanwhile keeps it out of the cache
    reader: CheckinReader | None = getattr(app.state, "checkin_reader", None)
    idle = None
    own = 0  # invalidations the full path's own commits caused (not a change it missed)
    if reader is not None:
        row = await reader.lookup(key)
        if row is None:
            raise unauthorized(*UNKNOWN_DEVICE)
        idle = idle_answer(row, body, if_none_match, now=now, poll_seconds=settings.poll_seconds)
    if idle is not None:
        result, due = idle
        if due and reader is not None:
            reader.seen(result.device_id, now)
    else:
        result, own = await run_in_threadpool(_full, app, key, body, now)
    if not body.actions:
        entry = Entry(result.device_id, result.etag, digest, result.seen_at, now + cache.ttl)
        # cached only if every invalidation since ``epoch`` was the check-in's own
        cache.put(key, entry, epoch=epoch + own)
    return result


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
    """Report, and get the desired state (304 when the If-None-Match ETag is current)."""
    seen: Computed | None = getattr(request.state, STATE_KEY, None)
    if seen is not None and seen.authorization == authorization:
        key = seen.key
    else:
        seen, key = None, credential_key(authorization)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise api_error(413, "too_large", f"check-in over {MAX_BODY_BYTES} bytes", where="body")
    digest = seen.digest if seen is not None and seen.size == len(raw) else None
    result = await answer(request.app, key, raw, if_none_match, digest)
    etag = result.etag if result else sent_etag(if_none_match)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if result is None or result.payload is None or etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(result.payload, media_type="application/json", headers=headers)


@router.post("/actions", status_code=204)
def report_actions(
    body: ActionReport, device: DeviceDep, session: SessionDep, request: Request
) -> Response:
    """Progress of an install, between check-ins (written in groups per rollout)."""
    report_actions_of(session, device, body.actions, _context(request.app))
    return Response(status_code=204)
