"""The idle fleet's check-in cache hit, answered before routing (a pure ASGI middleware).

An idle device's poll is nearly always a hit in the check-in cache (``checkin_cache.py``):
same credential, same body bytes, current ETag, so the answer is a 304 from memory. Answered
by the route, that 304 still paid for FastAPI's whole stack (routing, dependency and header
resolution, a ``Request``, a ``Response``): py-spy on a server under the idle-fleet bench put
most of a hit's time there, and the servers saturated at ~1,750 check-ins/s on two cores.

This layer looks at ``POST /device/v1/checkin`` carrying both ``Authorization`` and
``If-None-Match`` only. It reads the body (at most ``MAX_BODY_BYTES``, the route's own limit),
computes the credential key and the body digest exactly as the route does and asks the same
question (``checkin.cache_says_304``). On a hit it sends the route's 304 itself: the same two
headers (``ETag``, ``Cache-Control: no-cache``), no body, and the cache's hit counter moves
as it would have. Anything else (no such headers, a malformed credential, a body over the
limit or cut short, a miss) goes on to the app with every message it read replayed first, so
the route sees the same bytes and answers (or refuses) as if this layer did not exist. What it
computed on the way (the credential key, the body digest) goes along in the scope's state
(``checkin.Computed``), so the route does not compute it again.

Why this is safe: a 304 needs a live cache entry, entries exist only after a full check-in
authenticated the credential against the database, and a change of desired state or
credential (revoke, rotate, delete) drops them (``server/invalidation.py``), so a revoked
device's next poll misses and the route answers 401. Nothing else sits between the app and
the route that would notice a hit: ``BodyLimitMiddleware`` stays outside this layer, and the
server keeps no per-request metrics or logs of its own (uvicorn's access log is written by
the server, outside the app, so it still sees every request).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmops.server.api.device.checkin import (
    MAX_BODY_BYTES,
    STATE_KEY,
    Computed,
    body_digest,
    cache_says_304,
    credential_key,
    sent_etag,
)
from slmops.server.api.device.fast_path import first_headers, posted_to, replay

PATH = "/device/v1/checkin"
_NO_CACHE = (b"cache-control", b"no-cache")


class FastCheckin:
    """Answer check-in cache hits before routing; hand everything else on unchanged."""

    def __init__(self, app: ASGIApp, *, state: Any) -> None:
        self.app, self.state = app, state  # the FastAPI app's state (settings, checkin_cache)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not posted_to(scope, PATH):
            await self.app(scope, receive, send)
            return
        got = first_headers(scope, b"authorization", b"if-none-match", b"content-length")
        authorization, if_none_match = got.get(b"authorization"), got.get(b"if-none-match")
        length = got.get(b"content-length", "0")
        declared = int(length) if length.isdigit() else MAX_BODY_BYTES + 1
        if authorization is None or not if_none_match or declared > MAX_BODY_BYTES:
            await self.app(scope, receive, send)
            return
        try:
            key = credential_key(authorization)
        except HTTPException:  # malformed: the route answers 401 in the error envelope
            await self.app(scope, receive, send)
            return
        read: list[Message] = []
        try:
            raw = await _read_body(receive, read)
        except Exception as exc:  # the body limit or the server: the route must see it
            _hand_on(scope, Computed(authorization, key, -1, None))
            await self.app(scope, replay(read, receive, exc), send)
            return
        digest = None
        if raw is not None:
            digest = body_digest(raw)
            if cache_says_304(
                self.state, key, digest, if_none_match, time.time(), count_miss=False
            ):
                etag = sent_etag(if_none_match).encode("latin-1")
                headers = [(b"etag", etag), _NO_CACHE]
                await send({"type": "http.response.start", "status": 304, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
        size = len(raw) if raw is not None else -1
        _hand_on(scope, Computed(authorization, key, size, digest))
        await self.app(scope, replay(read, receive, None), send)


def _hand_on(scope: Scope, computed: Computed) -> None:
    """Leave what this layer computed for the route (``request.state``): the server's
    per-request copy of the lifespan state, or a dict of the request's own."""
    scope.setdefault("state", {})[STATE_KEY] = computed


async def _read_body(receive: Receive, read: list[Message]) -> bytes | None:
    """The whole body, every message kept in ``read``; None when it is over the limit or the
    client went away (the route then reads on and answers as it always does)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
