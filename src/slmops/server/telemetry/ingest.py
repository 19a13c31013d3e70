"""POST /device/v1/telemetry: a device delivers a batch of window aggregates.

The body is a ``TelemetryBatch`` as JSON, gzip-compressed when ``Content-Encoding: gzip``.
Limits: ``MAX_BODY`` bytes as sent and ``MAX_JSON`` bytes once decompressed; the body is read
and inflated in chunks with a bounded output per step, so a zip bomb is refused with 413 after
inflating at most ``MAX_JSON`` bytes, never held whole in memory. Bad gzip answers 400
(``bad_encoding``), bad JSON or a batch that does not validate 422 (``invalid_request``), all in
the API's error envelope. The answer is 200 ``{"batch_id", "accepted", "duplicate"}``; a retried
``batch_id`` answers ``duplicate: true`` and stores nothing (``store.py``).

Values are validated by the schema (finite, non-negative counts, known error kinds: NaN or
Infinity is a 422, never a 500 or a ``+Inf`` on /metrics). Windows outside a bounded clock skew
of the server's time (started over 24 h ago, or ending over 5 min ahead: ``store.MAX_AGE_S``,
``store.MAX_AHEAD_S``) are not stored and are counted in the answer's ``skipped``. Each window
is attributed from the server's record of what the device runs (``store.attribute``), never
from the model, version or rollout the device claims. The hardware class of every window is
the device's profile at the time of delivery. The device is read with other requests' in one
query, and the batch stored with theirs, in one transaction of the writer thread
(``writer.py``); the answer comes after the commit.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select

from slmops.protocol.telemetry import TelemetryBatch
from slmops.server.api.deps import UNKNOWN_DEVICE, device_secret, unauthorized
from slmops.server.db.models import Device
from slmops.server.db.session import Database
from slmops.server.errors import api_error
from slmops.server.openapi import DEVICE_SECURITY, errors, json_body
from slmops.server.security import TokenKind, hash_secret
from slmops.server.telemetry.store import Stored, store_batch
from slmops.server.telemetry.writer import TelemetryWriter, UnknownDevice

router = APIRouter(tags=["device"])

MAX_BODY = 1 << 20  # 1 MiB as sent
MAX_JSON = 8 << 20  # 8 MiB decompressed
MEDIA_TYPE = "application/json"
# The request state's key under which the fast path (api/device/fast_telemetry.py) leaves the
# refusal it already met for an unknown device, so the route does not store-and-fail again.
REFUSED_KEY = "slmops.telemetry.refused"


class TelemetryAccepted(BaseModel):
    batch_id: str
    accepted: int
    duplicate: bool
    skipped: int = Field(0, description="windows outside the clock-skew bounds, not stored")


def _too_large(what: str, limit: int) -> Exception:
    return api_error(
        413,
        "payload_too_large",
        f"telemetry batch larger than {limit} bytes {what}",
        where="body",
        hint="send fewer windows per batch",
    )


async def read_body(request: Request, gzipped: bool) -> bytes:
    """The request body, inflated when gzipped, within the limits (413 past them)."""
    return await inflate(request.stream(), gzipped, request.headers.get("content-length", ""))


async def inflate(chunks: AsyncIterator[bytes], gzipped: bool, declared: str) -> bytes:
    """The body from its ``chunks``, inflated when gzipped, within ``MAX_BODY`` as sent and
    ``MAX_JSON`` inflated (413 past them, 400 for bad gzip); ``declared`` is the request's
    Content-Length header (refused before anything is read when it is over the limit)."""
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large("as sent", MAX_BODY)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    received = 0
    out = bytearray()
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > MAX_BODY:
                raise _too_large("as sent", MAX_BODY)
            if inflater is None:
                out += chunk
                continue
            data = chunk
            while data:
                out += inflater.decompress(data, MAX_JSON + 1 - len(out))
                if len(out) > MAX_JSON:
                    raise _too_large("decompressed", MAX_JSON)
                data = inflater.unconsumed_tail
        if inflater is not None:
            out += inflater.flush()
            if not inflater.eof:
                raise zlib.error("truncated gzip stream")
    except zlib.error as exc:
        raise api_error(
            400,
            "bad_encoding",
            f"body is not valid gzip: {exc}",
            where="body",
            hint="send gzip with Content-Encoding: gzip, or plain JSON without it",
        ) from None
    if len(out) > MAX_JSON:
        raise _too_large("decompressed", MAX_JSON)
    return bytes(out)


def content_coding(header: str | None) -> str:
    """``gzip`` or ``identity`` from the Content-Encoding header; 415 for anything else."""
    encoding = (header or "identity").strip().lower()
    if encoding not in ("gzip", "identity"):
        raise api_error(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding!r} is not supported",
            where="Content-Encoding",
            hint="use gzip or no encoding",
        )
    return encoding


def parse_batch(body: bytes) -> TelemetryBatch:
    """The validated batch; 422 naming the first problem (and how many more) otherwise."""
    try:
        return TelemetryBatch.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise api_error(
            422,
            "invalid_request",
            f"{first.get('msg', 'invalid telemetry batch')}{more}",
            where=f"body.{where}" if where != "body" else where,
            hint="send a slmops.telemetry/v1 batch; unknown keys are refused",
        ) from None


def answer(stored: Stored) -> bytes:
    """The 200 answer's JSON body (serialized once: returned as a model, FastAPI would dump,
    validate and encode it again; ``response_model`` still documents it)."""
    accepted = TelemetryAccepted(
        batch_id=stored.batch_id,
        accepted=stored.windows,
        duplicate=stored.duplicate,
        skipped=stored.skipped,
    )
    return accepted.model_dump_json().encode()


def _store(db: Database, key: str, batch: TelemetryBatch) -> Stored:
    """Authenticate and store on one worker thread, in one session (this is the hot path)."""
    with db.sessions() as session:
        device = session.scalar(select(Device).where(Device.credential_hash == key))
        if device is None:
            raise unauthorized(*UNKNOWN_DEVICE)
        return store_batch(session, device, batch)


async def stored_batch(state: Any, key: str, batch: TelemetryBatch) -> Stored:
    """The batch is stored in a group commit with other requests' (``writer.py``), whose
    transaction also reads their devices by credential in one query: one thread hop per
    request. An app without the writer (not started) stores it alone. 401 when no device
    holds the credential (``state``: the app's state)."""
    writer: TelemetryWriter | None = getattr(state, "telemetry_writer", None)
    if writer is None:
        return await run_in_threadpool(_store, state.db, key, batch)
    try:
        return await writer.store_for(key, batch)
    except UnknownDevice:
        raise unauthorized(*UNKNOWN_DEVICE) from None


@router.post(
    "/telemetry",
    response_model=TelemetryAccepted,
    responses=errors(400, 415),
    openapi_extra=json_body(
        TelemetryBatch,
        description="a slmops.telemetry/v1 batch as JSON, gzip-compressed with "
        "`Content-Encoding: gzip` (agents always compress; plain JSON is accepted too)",
    )
    | DEVICE_SECURITY,
)
async def post_telemetry(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    content_encoding: Annotated[str | None, Header()] = None,
) -> Response:
    """Store a batch of telemetry windows (idempotent per ``batch_id``). The credential's
    shape is checked before the body is read; its database lookup happens with the store."""
    refused = request.scope.get("state", {}).get(REFUSED_KEY)
    if isinstance(refused, HTTPException):
        raise refused
    key = hash_secret(device_secret(authorization), TokenKind.DEVICE)
    encoding = content_coding(content_encoding)
    batch = parse_batch(await read_body(request, encoding == "gzip"))
    stored = await stored_batch(request.app.state, key, batch)
    return Response(answer(stored), media_type=MEDIA_TYPE)
