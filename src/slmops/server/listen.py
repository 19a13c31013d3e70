"""Serve N API processes on one listening socket, with TCP_NODELAY on every connection.

Why not ``uvicorn.run(..., workers=N)`` as it is: uvicorn binds the shared socket as
``socket.socket(AF_INET, SOCK_STREAM)``, whose ``proto`` is 0, and asyncio turns Nagle's
algorithm off only on sockets whose ``proto`` says TCP (``asyncio.base_events._set_nodelay``).
Connections accepted by a worker inherit that 0, so they kept Nagle on: a response written as
its head and then its body held the body until the client acknowledged the head, and the
client delays that ACK (~40 ms on Linux). Measured with the telemetry bench, 16 keep-alive
connections: every request took ~47-56 ms at p50 with 2 workers, on the bare FastAPI endpoint
as on slmops, against ~5 ms with 1 worker (where uvicorn lets asyncio bind the socket from
``getaddrinfo``, proto 6). Re-wrapping the bound descriptor lets the kernel report its real
protocol (``SO_PROTOCOL``), so each worker's accepted sockets get TCP_NODELAY.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any


def tcp_socket(config: Any) -> socket.socket:
    """uvicorn's bound listening socket (``config.bind_socket()``: host, port, reuse, the
    same log line), re-wrapped so its ``proto`` is the kernel's (IPPROTO_TCP for TCP)."""
    bound: socket.socket = config.bind_socket()
    if bound.family not in (socket.AF_INET, socket.AF_INET6):
        return bound  # a unix socket has no Nagle to turn off
    return socket.socket(fileno=bound.detach())


def serve_workers(app: str, **options: Any) -> None:
    """``uvicorn.run(app, workers=N, **options)`` on a socket whose connections get
    TCP_NODELAY (see the module docstring)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(app, **options)
    with contextlib.suppress(KeyboardInterrupt):
        Multiprocess(config, sockets=[tcp_socket(config)]).run()
