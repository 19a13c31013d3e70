"""An app served by a real uvicorn on 127.0.0.1 in a thread of the test process, so a test can
look at the app's own state (its check-in cache) while it talks HTTP to it, and count how
often the check-in route's ``answer`` ran (a cache hit answered before routing never does)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from helpers import free_port
from slmops.server.api.device import checkin


@contextlib.contextmanager
def served_in_thread(app: Any) -> Iterator[tuple[str, list[int]]]:
    """The app's URL and a list that grows by one each time the check-in route answers."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    calls: list[int] = []
    real = checkin.answer

    async def counted(*args: Any, **kwargs: Any) -> checkin.Answer | None:
        calls.append(1)
        return await real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(checkin, "answer", counted)
    try:
        yield f"http://127.0.0.1:{port}", calls
    finally:
        mp.undo()
        server.should_exit = True
        thread.join(timeout=15)
