"""The agent's one HTTP transport, on the standard library, for the control plane and the registry.

Before this there were two stacks (http.client for check-ins, httpx for registry pulls), with
different proxy, TLS and error behaviour, and httpx (with h11, httpcore and a CA bundle per
client) was the largest part of an idle agent's memory. Now both go through `HttpTransport`:

- kept-alive connections, one pool per scheme/host/port; a kept-alive connection the server
  closed while we were idle fails on first use, and that request is sent once more;
- ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (either case) honoured the same way for every
  request, never for loopback; https through a proxy is a CONNECT tunnel;
- TLS verifies against the system store, or a CA file (``ca_file``, else ``SSL_CERT_FILE``);
  ``ssl`` is imported only for the first https request;
- GET/HEAD redirects followed (registries on object storage redirect blob GETs), without the
  Authorization header once the host changes;
- streamed bodies: `Response.iter_bytes` yields pieces as they arrive (blob downloads, Range
  resumes), and memory stays one piece per transfer;
- every network failure is a `TransportError` that names the URL.

`FakeTransport(handler)` answers from a function, like httpx.MockTransport, for tests that need a
control plane or a registry that misbehaves on purpose.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

from slmops.core.errors import ToolError
from slmops.protocol.registry_url import is_loopback

LOOPBACK = ("localhost", "127.0.0.1", "::1")
PIECE = 1 << 20
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


class TransportError(ToolError):
    """The server could not be reached, timed out or broke the connection (exit code 1)."""


@dataclass
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Response:
    """Status, lower-cased headers and the body as an iterator of pieces (read it or close)."""

    status: int
    reason: str
    headers: dict[str, str]
    body: Iterator[bytes] = field(default_factory=lambda: iter(()))
    url: str = ""
    _close: Callable[[], None] = field(default=lambda: None, repr=False)

    def iter_bytes(self) -> Iterator[bytes]:
        return self.body

    def read(self, limit: int | None = None) -> bytes:
        """The whole body; with `limit`, raise ValueError as soon as it grows past it."""
        out = bytearray()
        for piece in self.body:
            out += piece
            if limit is not None and len(out) > limit:
                self.close()
                raise ValueError(f"body over {limit} bytes")
        self.close()
        return bytes(out)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport(Protocol):
    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        *,
        stream: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """Send one request; with `stream` the body is read as it is iterated."""
        ...

    def close(self) -> None: ...


def proxy_for(scheme: str, host: str) -> tuple[str, int] | None:
    """The proxy (host, port) the environment names for this server, if any."""
    if host in LOOPBACK:
        return None
    no_proxy = os.environ.get("NO_PROXY", os.environ.get("no_proxy", ""))
    for entry in (e.strip().lstrip(".") for e in no_proxy.split(",")):
        if entry and (entry == "*" or host == entry or host.endswith("." + entry)):
            return None
    name = f"{scheme}_proxy"
    url = os.environ.get(name, os.environ.get(name.upper(), ""))
    if not url:
        return None
    parts = urlsplit(url if "://" in url else "http://" + url)
    return (parts.hostname or "", parts.port or 80) if parts.hostname else None


_Key = tuple[str, str, int]


class HttpTransport:
    """Standard-library HTTP/1.1 with kept-alive connections (see the module docstring)."""

    def __init__(self, *, timeout: float = 30.0, ca_file: str | None = None) -> None:
        self.timeout = timeout
        self.ca_file = ca_file
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl: Any = None

    def _context(self) -> Any:
        if self._ssl is None:
            import ssl

            cafile = self.ca_file or os.environ.get("SSL_CERT_FILE") or None
            self._ssl = ssl.create_default_context(cafile=cafile)
        return self._ssl

    def _connect(self, key: _Key, timeout: float) -> http.client.HTTPConnection:
        scheme, host, port = key
        proxy = proxy_for(scheme, host)
        if scheme == "https":
            if proxy:
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    *proxy, timeout=timeout, context=self._context()
                )
                conn.set_tunnel(host, port)
                return conn
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._context())
        if proxy:
            return http.client.HTTPConnection(*proxy, timeout=timeout)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _take(self, key: _Key) -> http.client.HTTPConnection | None:
        with self._lock:
            pool = self._idle.get(key)
            return pool.pop() if pool else None

    def _give(self, key: _Key, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(conn)

    def close(self) -> None:
        with self._lock:
            conns = [c for pool in self._idle.values() for c in pool]
            self._idle.clear()
        for c in conns:
            with contextlib.suppress(OSError):
                c.close()

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        *,
        stream: bool = False,
        timeout: float | None = None,
    ) -> Response:
        hdrs = dict(headers or {})
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._once(method, url, hdrs, body, stream, timeout or self.timeout)
            location = resp.headers.get("location")
            if method not in ("GET", "HEAD") or resp.status not in _REDIRECTS or not location:
                return resp
            resp.close()
            new = urljoin(url, location)
            to, came = urlsplit(new), urlsplit(url)
            if (
                came.scheme == "https"
                and to.scheme == "http"
                and not is_loopback(to.hostname or "")
            ):
                # a redirect must not take a request (and its credential) off TLS
                raise TransportError(
                    f"refused a redirect from https to plain http: {new}", where=url
                )
            if to.netloc != came.netloc:
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
            url = new
        raise TransportError(f"more than {MAX_REDIRECTS} redirects", where=url)

    def _once(
        self, method: str, url: str, headers: dict[str, str], body: bytes, stream: bool, t: float
    ) -> Response:
        parts = urlsplit(url)
        scheme = parts.scheme or "http"
        if scheme not in ("http", "https"):
            raise TransportError(f"unsupported URL scheme {scheme!r}", where=url)
        host = parts.hostname or "localhost"
        key: _Key = (scheme, host, parts.port or (443 if scheme == "https" else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if scheme == "http" and proxy_for(scheme, host):
            target = f"http://{parts.netloc}{target}"
        for attempt in (0, 1):
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = self._connect(key, t)
            try:
                conn.timeout = t
                if conn.sock is not None:
                    conn.sock.settimeout(t)
                conn.request(method, target, body=body or None, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                with contextlib.suppress(OSError):
                    conn.close()
                # a kept-alive connection the server closed while idle: that request never
                # reached the server, so it is sent once more on a new connection
                if reused and attempt == 0:
                    continue
                raise TransportError(f"{type(exc).__name__}: {exc}", where=url) from None
            return self._wrap(key, conn, resp, url, stream, method)
        raise AssertionError("unreachable")  # pragma: no cover

    def _wrap(
        self,
        key: _Key,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        url: str,
        stream: bool,
        method: str,
    ) -> Response:
        headers = {k.lower(): v for k, v in resp.getheaders()}
        done = [False]

        def finish(complete: bool) -> None:
            if done[0]:
                return
            done[0] = True
            resp.close()  # http.client reuses a connection only once its response is closed
            if complete and not resp.will_close:
                self._give(key, conn)
            else:
                with contextlib.suppress(OSError):
                    conn.close()

        def pieces() -> Iterator[bytes]:
            try:
                while piece := resp.read1(PIECE):
                    yield piece
            except (OSError, http.client.HTTPException) as exc:
                finish(False)
                raise TransportError(f"{type(exc).__name__}: {exc}", where=url) from None
            finish(True)

        out = Response(resp.status, resp.reason, headers, pieces(), url, lambda: finish(False))
        if not stream:
            data = out.read()
            return Response(resp.status, resp.reason, headers, iter((data,) if data else ()), url)
        return out


Handler = Callable[[Request], Response]


class FakeTransport:
    """Answers every request from `handler` (no sockets); records what was sent in `requests`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        *,
        stream: bool = False,
        timeout: float | None = None,
    ) -> Response:
        req = Request(method, url, dict(headers or {}), body)
        self.requests.append(req)
        resp = self.handler(req)
        resp.headers = {k.lower(): v for k, v in resp.headers.items()}
        resp.url = resp.url or url
        return resp

    def close(self) -> None:
        pass


def reply(
    status: int, body: bytes = b"", headers: Mapping[str, str] | None = None, piece: int = PIECE
) -> Response:
    """A Response for FakeTransport handlers, its body cut into `piece`-sized chunks."""
    chunks = [body[i : i + piece] for i in range(0, len(body), piece)]
    hdrs = {"content-length": str(len(body)), **{k.lower(): v for k, v in (headers or {}).items()}}
    return Response(status, "", hdrs, iter(chunks))
