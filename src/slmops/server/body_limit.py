"""One request-body limit for every route, enforced while the body is read (pure ASGI).

Why a middleware: FastAPI reads a JSON body whole before it resolves any dependency, so a
route's own size check or its authentication comes after the memory is spent (a 200 MiB body
with a made-up credential grew the server by ~380 MiB). This layer sits outside the app:

- a declared ``Content-Length`` over the limit is answered 413 at once, the app never runs and
  the connection is closed (nothing of the body is read);
- a body without one (chunked) is counted as the app reads it; the read that crosses the limit
  raises :class:`BodyTooLarge`, an ``HTTPException`` the app's handlers render as 413 in the
  error envelope (FastAPI re-raises HTTPExceptions from body parsing untouched).

Limits (``limit_for``): ``default`` (1 MiB) everywhere; registry manifests up to
``MAX_MANIFEST_BYTES``; registry blob uploads (``/v2/<name>/blobs/uploads/...``) up to
``uploads``. Those routes authenticate the pusher (operator role) before reading the body and
stream it to disk in pieces, so the large limit never buffers anything. Telemetry keeps its own
decompressed bound (``server/telemetry/ingest.py``); the dashboard's forms theirs (64 KiB).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmops.bundle.media import MAX_BLOB_BYTES, MAX_MANIFEST_BYTES
from slmops.server.errors import envelope, in_registry, oci_body

DEFAULT_LIMIT = 1 << 20  # 1 MiB: every JSON route, the device API, the dashboard's forms
HINT = "send a smaller body; registry blob uploads (operator tokens) are the only large bodies"


def _detail(limit: int) -> dict[str, Any]:
    body: dict[str, Any] = envelope(
        "payload_too_large", f"request body over {limit} bytes", where="body", hint=HINT
    )["error"]
    return body


class BodyTooLarge(HTTPException):
    """The body crossed its route's limit while being read (rendered as 413, envelope)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=_detail(limit), headers={"Connection": "close"})


def limit_for(path: str, *, default: int, uploads: int) -> int:
    """The body limit of a request path: large only for registry blob uploads and manifests."""
    if path.startswith("/v2/"):
        if "/blobs/uploads/" in path:
            return uploads
        if "/manifests/" in path:
            return max(default, MAX_MANIFEST_BYTES)
    return default


class BodyLimitMiddleware:
    """Refuse or cut off request bodies over ``limit_for(path)`` (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, *, default: int = DEFAULT_LIMIT, uploads: int = MAX_BLOB_BYTES
    ) -> None:
        self.app, self.default, self.uploads = app, default, uploads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = limit_for(scope.get("path", ""), default=self.default, uploads=self.uploads)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, limit, scope.get("path", ""))
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length; a malformed one counts as unknown (the server refuses it first)."""
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _refuse(send: Send, limit: int, path: str) -> None:
    doc = {"error": _detail(limit)}
    if in_registry(path):  # registry clients parse the OCI error shape
        doc = oci_body(413, str(doc["error"]["message"]))
    body = json.dumps(doc).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
