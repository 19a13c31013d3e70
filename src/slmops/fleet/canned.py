"""The cheapest responder for the device routes: what the simulator alone can drive.

A plain asyncio HTTP/1.1 server (the same shape as bench/fleet.py's canned 304 responder,
grown to the routes a simulated device calls): enroll answers 201 with a credential, a
check-in with ``If-None-Match`` answers 304 and one without it 200 with an empty desired
state, actions 204, telemetry 200. It reads no database and parses no JSON beyond the device
id, so a simulator run against it measures the simulator (and the box), not a server.

Run it in its own process (``python -m slmops.fleet.canned PORT``) so it does not share the
simulator's event loop; ``canned_server()`` does that and waits until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

ETAG = '"canned0000000000000000000000000000"'
_DESIRED = json.dumps(
    {"schema": "slmops.device/v1", "device_id": "canned", "model": None, "poll_seconds": 60.0}
).encode()


def _reply(status: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\n{extra}content-length: {len(body)}\r\n"
    if body:
        head += "content-type: application/json\r\n"
    return head.encode() + b"\r\n" + body


NOT_MODIFIED = _reply("304 Not Modified", extra=f"etag: {ETAG}\r\ncache-control: no-cache\r\n")
DESIRED = _reply("200 OK", _DESIRED, extra=f"etag: {ETAG}\r\ncache-control: no-cache\r\n")
NO_CONTENT = _reply("204 No Content")
ACCEPTED = _reply("200 OK", b'{"batch_id":"canned","accepted":1,"duplicate":false}')
OK = _reply("200 OK", b'{"status":"ok"}')
NOT_FOUND = _reply("404 Not Found", b'{"error":{"code":"not_found","message":"canned"}}')


def _enrolled(body: bytes) -> bytes:
    try:
        device_id = str(json.loads(body)["device_id"])
    except (ValueError, KeyError, TypeError):
        device_id = "unknown"
    doc = {"device_id": device_id, "credential": "slmd_canned" + "0" * 32, "status": "enrolled"}
    return _reply("201 Created", json.dumps(doc).encode())


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length, etag = 0, False
            for line in head.split(b"\r\n"):
                low = line[:16].lower()
                if low.startswith(b"content-length:"):
                    length = int(line[15:])
                elif low.startswith(b"if-none-match:"):
                    etag = True
            body = await reader.readexactly(length) if length else b""
            target = head.split(b" ", 2)[1]
            if target.endswith(b"/checkin"):
                writer.write(NOT_MODIFIED if etag else DESIRED)
            elif target.endswith(b"/actions"):
                writer.write(NO_CONTENT)
            elif target.endswith(b"/telemetry"):
                writer.write(ACCEPTED)
            elif target.endswith(b"/enroll"):
                writer.write(_enrolled(body))
            elif target.endswith(b"/healthz"):
                writer.write(OK)
            else:
                writer.write(NOT_FOUND)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def canned_server(timeout: float = 20.0) -> Iterator[str]:
    """Start the responder in a child process on a free 127.0.0.1 port; yield its URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "slmops.fleet.canned", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the canned responder exited with {proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the canned responder did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":  # pragma: no cover - exercised through canned_server()
    asyncio.run(serve(int(sys.argv[1])))
