"""A small HTTP/1.1 keep-alive client on raw asyncio streams, for the simulator's hot path.

Why not httpx's AsyncClient: measured here against the canned responder (canned.py) with 64
connections, one process of it answered 79 requests/s and this client 4,656/s; the load
generator must not measure itself. This client pre-formats the request head, reuses
a bounded set of connections per server and parses only the status line, the few headers the
device protocol uses and a ``Content-Length`` or chunked body. Plain ``http://`` and
``https://`` (default TLS verification) only; no redirects, no proxies.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from slmops.core.errors import UserInputError

MAX_HEAD = 64 * 1024


class HttpFailure(Exception):
    """A request that got no HTTP answer; ``kind`` is connect, timeout, reset or protocol."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        super().__init__(f"{kind}: {detail}")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    seconds: float = 0.0  # from sending to the whole answer read, without waiting for a slot


def parse_url(url: str) -> tuple[str, int, bool, str]:
    """(host, port, tls, base path) of a server URL, or a UserInputError naming the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserInputError(
            f"not an http(s) URL: {url!r}",
            where="--server",
            hint="pass the control plane's base URL, e.g. http://127.0.0.1:8080",
        )
    tls = parts.scheme == "https"
    return parts.hostname, parts.port or (443 if tls else 80), tls, parts.path.rstrip("/")


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class Pool:
    """At most ``size`` kept-alive connections to one server, shared by every device on it."""

    def __init__(self, url: str, size: int, timeout: float) -> None:
        self.host, self.port, tls, self.base = parse_url(url)
        self.ssl = ssl.create_default_context() if tls else None
        self.timeout = timeout
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(size)
        self._host_line = f"Host: {self.host}:{self.port}\r\n"

    async def _open(self) -> _Conn:
        try:
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl, limit=MAX_HEAD
            )
        except OSError as exc:
            raise HttpFailure("connect", f"{self.host}:{self.port}: {exc}") from None
        return _Conn(reader, writer)

    async def request(self, method: str, path: str, headers: str, body: bytes = b"") -> Answer:
        """One exchange. ``headers`` is pre-formatted ``Name: value\\r\\n`` lines (the caller
        caches them per device), Content-Length is added here."""
        head = (
            f"{method} {self.base}{path} HTTP/1.1\r\n{self._host_line}{headers}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        async with self._slots:
            t0 = time.perf_counter()
            conn = self._idle.pop() if self._idle else None
            fresh = conn is None
            try:
                async with asyncio.timeout(self.timeout):
                    if conn is None:
                        conn = await self._open()
                    try:
                        answer = await _exchange(conn, head + body)
                    except HttpFailure:
                        if fresh:
                            raise
                        # a kept-alive connection the server closed meanwhile: one fresh retry
                        conn.close()
                        conn = await self._open()
                        answer = await _exchange(conn, head + body)
            except TimeoutError:
                if conn is not None:
                    conn.close()
                raise HttpFailure("timeout", f"no answer within {self.timeout:g} s") from None
            except HttpFailure:
                if conn is not None:
                    conn.close()
                raise
            if answer.headers.get("connection", "").lower() == "close":
                conn.close()
            else:
                self._idle.append(conn)
            return replace(answer, seconds=time.perf_counter() - t0)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def _exchange(conn: _Conn, data: bytes) -> Answer:
    reader = conn.reader
    try:
        conn.writer.write(data)
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise HttpFailure("reset", f"connection closed: {type(exc).__name__}") from None
    except asyncio.LimitOverrunError:
        raise HttpFailure("protocol", f"response head over {MAX_HEAD} bytes") from None
    lines = raw[:-4].decode("latin-1").split("\r\n")
    try:
        status = int(lines[0][9:12])
    except ValueError:
        raise HttpFailure("protocol", f"bad status line {lines[0][:80]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _chunked(reader)
        else:
            length = int(headers.get("content-length") or 0)
            body = await reader.readexactly(length) if length else b""
    except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
        raise HttpFailure("reset", f"body cut short: {type(exc).__name__}") from None
    return Answer(status, headers, body)


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)
