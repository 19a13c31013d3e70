"""A well-formed telemetry batch, stored and answered before routing (a pure ASGI middleware).

Why: a device's batch is small (~0.5 KB gzip, one window) and the writer stores it in a group
commit, so most of a request's cost was FastAPI's stack around the route: routing past every
operator route, header dependencies, a ``Request``, a ``Response`` and the app's middleware.
py-spy on one API process under bench/telemetry.py put the event loop at ~580 us a batch
against ~270 us for a bare FastAPI endpoint doing the same parse, and the process is bound by
the one interpreter lock that the event loop and the writer thread share.

This layer takes ``POST /device/v1/telemetry`` with an ``Authorization`` header only, and runs
the route's own steps (``ingest.py``: ``credential_key``, ``content_coding``, ``inflate``,
``parse_batch``, ``stored_batch``, ``answer``) in the route's order. When every step succeeds
it sends the route's 200 itself (same body, same ``Content-Type``). When any step refuses
(malformed credential, unsupported encoding, over a limit, bad gzip, invalid batch, unknown
device) nothing was stored, and the request goes on to the app with every message read so far
replayed first, so the route meets the same bytes and answers the refusal in the error envelope
exactly as it always has; an unknown device's refusal goes along in the request's state
(``ingest.REFUSED_KEY``), so the route raises it without parsing and looking up again. An
error of the server itself (the database) propagates as it would from the route. The body
limit (``body_limit.py``) sits outside this layer, as for every route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmops.server.api.device.checkin import credential_key
from slmops.server.api.device.fast_path import first_headers, posted_to, replay
from slmops.server.telemetry.ingest import (
    MEDIA_TYPE,
    REFUSED_KEY,
    answer,
    content_coding,
    inflate,
    parse_batch,
    stored_batch,
)

PATH = "/device/v1/telemetry"
_CONTENT_TYPE = (b"content-type", MEDIA_TYPE.encode())


class _ReceiveFailed(Exception):
    """``receive`` raised (the body limit's error: ``cause``) or gave a disconnect message
    (``cause`` None): the route must meet the same."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(str(cause))
        self.cause = cause


class FastTelemetry:
    """Store and answer well-formed telemetry batches before routing; hand the rest on."""

    def __init__(self, app: ASGIApp, *, state: object) -> None:
        self.app, self.state = app, state  # the FastAPI app's state (db, telemetry_writer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not posted_to(scope, PATH):
            await self.app(scope, receive, send)
            return
        got = first_headers(scope, b"authorization", b"content-encoding", b"content-length")
        authorization = got.get(b"authorization")
        if authorization is None:
            await self.app(scope, receive, send)
            return
        encoding, declared = got.get(b"content-encoding"), got.get(b"content-length", "")
        read: list[Message] = []

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                try:
                    message = await receive()
                except Exception as exc:
                    raise _ReceiveFailed(exc) from exc
                read.append(message)
                if message["type"] != "http.request":  # the client went away mid-body
                    raise _ReceiveFailed(None)
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        try:
            key = credential_key(authorization)
            gzipped = content_coding(encoding) == "gzip"
            batch = parse_batch(await inflate(chunks(), gzipped, declared))
        except _ReceiveFailed as exc:
            await self.app(scope, replay(read, receive, exc.cause), send)
            return
        except HTTPException:  # refused, nothing stored: the route answers it the same way
            await self.app(scope, replay(read, receive, None), send)
            return
        try:
            stored = await stored_batch(self.state, key, batch)
        except HTTPException as exc:  # no device holds the credential: nothing stored
            # the route raises this refusal without parsing and looking the device up again
            scope.setdefault("state", {})[REFUSED_KEY] = exc
            await self.app(scope, replay(read, receive, None), send)
            return
        body = answer(stored)
        headers = [(b"content-length", str(len(body)).encode()), _CONTENT_TYPE]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
