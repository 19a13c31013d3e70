"""The workers' listening socket: accepted connections must get TCP_NODELAY.

Without it, a response written as head then body waits for the client's delayed ACK (~40 ms a
request with 2 workers; see ``server/listen.py``). The check is what a worker does with the
socket: asyncio serves it and the accepted connection's own option is read."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from slmops.server.listen import tcp_socket


def _nodelay_of_accepted(sock: socket.socket) -> int:
    async def main() -> int:
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connection(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            got.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connection, sock=sock)
        async with server:
            _r, w = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            value = await asyncio.wait_for(got, 10)
            w.close()
            return value

    return asyncio.run(main())


def _config() -> uvicorn.Config:
    return uvicorn.Config("slmops.server.app:app_from_env", host="127.0.0.1", port=0)


def test_the_workers_socket_says_tcp_and_its_connections_get_nodelay() -> None:
    sock = tcp_socket(_config())
    assert sock.proto == socket.IPPROTO_TCP
    assert _nodelay_of_accepted(sock) != 0


def test_uvicorns_own_socket_still_leaves_nagle_on() -> None:
    """Why listen.py exists. When this fails, uvicorn binds with the TCP protocol itself and
    ``tcp_socket`` can go back to ``config.bind_socket()``."""
    sock = _config().bind_socket()
    assert sock.proto == 0
    assert _nodelay_of_accepted(sock) == 0
