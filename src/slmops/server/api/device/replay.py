"""Give the app back the request messages a fast path already read (both device fast paths).

A pure ASGI layer that reads a body to decide whether it can answer (``fast_checkin.py``,
``fast_telemetry.py``) must, when it cannot, hand the request on as if it had never looked:
the route then reads the same messages, in order, and meets the same end (a disconnect, the
body limit's error) the first reader met.
"""

from __future__ import annotations

from collections import deque

from starlette.types import Message, Receive


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
