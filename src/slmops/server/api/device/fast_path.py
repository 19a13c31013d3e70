"""What the device API's two fast paths share (``fast_checkin.py``, ``fast_telemetry.py``).

Each is a pure ASGI layer that takes one POST route's requests before routing, reads a few
headers, and reads the body to decide whether it can answer. When it cannot, it hands the
request on as if it had never looked (``replay``): the route then reads the same messages, in
order, and meets the same end (a disconnect, the body limit's error) the first reader met.
"""

from __future__ import annotations

from collections import deque

from starlette.types import Message, Receive, Scope


def posted_to(scope: Scope, path: str) -> bool:
    """An HTTP POST to exactly ``path`` (not under a mounted root path)."""
    return (
        scope["type"] == "http"
        and scope["path"] == path
        and scope["method"] == "POST"
        and not scope.get("root_path")
    )


def first_headers(scope: Scope, *names: bytes) -> dict[bytes, str]:
    """The first value of each of ``names`` (lower-case) the request carries."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in names and name not in found:
            found[name] = value.decode("latin-1")
    return found


def replay(read: list[Message], receive: Receive, error: BaseException | None) -> Receive:
    """A ``receive`` that gives back ``read`` first, then raises ``error`` (what the first
    reader met) or carries on with the real one."""
    pending = deque(read)

    async def replayed() -> Message:
        if pending:
            return pending.popleft()
        if error is not None:
            raise error
        return await receive()

    return replayed
