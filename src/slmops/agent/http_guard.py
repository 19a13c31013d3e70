"""Checks the agent's local API runs on every request before it reads a body or generates.

The API listens on 127.0.0.1, but "local" is not "trusted": a kiosk browser on the same box can
be pointed at it by any web page (DNS rebinding: ``evil.example`` resolving to 127.0.0.1, so the
browser sends ``Host: evil.example``), and any local process can send a malformed request. So:

- ``Host`` must name this server (127.0.0.1, localhost, [::1] or the configured bind host, with
  this server's port if a port is given), else 421: a rebinding page never gets an answer.
- An optional API key (from the blueprint) is checked in constant time, on every route.
- ``Content-Length`` is strict: digits only, one value, at most the limit; a POST without it
  (or with ``Transfer-Encoding``, which this server does not decode) is refused before a byte
  of body is read, and the connection is closed so unread bytes are never parsed as a request.
- Request line and headers must arrive within a deadline (``HeaderDeadlines``), however slowly
  they trickle in.

Each refusal is an ``ApiError`` with the status and, where HTTP defines one, the header a client
needs (``WWW-Authenticate``, ``Retry-After``).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import re
import socket
import threading
import time
from email.message import Message

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
_DIGITS = re.compile(r"[0-9]{1,12}\Z")
_HOST = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(?P<port>[0-9]{1,5}))?\Z")
_WILDCARDS = frozenset({"0.0.0.0", "::", "[::]", ""})


class ApiError(Exception):
    """An error answered in OpenAI's shape: status, message, type, param, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}


class Refused(ApiError):
    """Refused before the request was understood (Host, key, framing): not counted as traffic."""


def _bracket(host: str) -> str:
    """An IPv6 literal as it appears in a Host header (``[::1]``); other names lower-cased."""
    host = host.strip().lower()
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def allowed_host_names(bind_host: str) -> frozenset[str]:
    """Names a Host header may carry for a server bound to `bind_host`."""
    return LOOPBACK_HOSTS | {_bracket(bind_host)} - _WILDCARDS


def check_host(value: str | None, allowed: frozenset[str], port: int, bind_host: str) -> None:
    """Refuse (421) a Host that does not name this server; 400 when there is none."""
    if value is None:
        raise Refused(400, "missing Host header", param="Host")
    m = _HOST.match(value.strip().lower())
    if m is None:
        raise Refused(400, f"malformed Host header {value[:100]!r}", param="Host")
    name, got_port = m["name"], m["port"]
    ok = name in allowed
    if not ok and _bracket(bind_host) in _WILDCARDS:
        # bound to every interface on purpose: any IP literal is this box (a rebinding page
        # always arrives with a DNS name, never a bare address)
        try:
            ipaddress.ip_address(name.strip("[]"))
            ok = True
        except ValueError:
            ok = False
    if not ok or (got_port is not None and int(got_port) != port):
        raise Refused(
            421,
            f"this API answers only to {', '.join(sorted(allowed))} on port {port}, "
            f"not to Host {value[:100]!r}",
            "misdirected_request",
            "Host",
        )


def check_api_key(authorization: str | None, key: str | None) -> None:
    """With a key configured, require ``Authorization: Bearer <key>`` (constant-time compare)."""
    if not key:
        return
    scheme, _, token = (authorization or "").partition(" ")
    good = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8")
    )
    if not good:
        raise Refused(
            401,
            "missing or wrong API key: send Authorization: Bearer <key> (set in the blueprint)",
            "authentication_error",
            headers={"WWW-Authenticate": 'Bearer realm="slmops-agent"'},
        )


def body_length(headers: Message, limit: int, *, method: str) -> int:
    """The body's length from a strict ``Content-Length``; refuse anything ambiguous.

    No header on a POST is 411 (we never read "until close"); ``Transfer-Encoding`` is 411 too
    (not decoded here, so its bytes would be read as the next request); several different
    values, signs, spaces inside or non-digits are 400; over `limit` is 413.
    """
    if headers.get("Transfer-Encoding") is not None:
        raise Refused(411, "Transfer-Encoding is not supported: send a Content-Length")
    values = headers.get_all("Content-Length") or []
    if not values:
        if method == "POST":
            raise Refused(411, "a POST needs a Content-Length header")
        return 0
    parts = {p.strip() for v in values for p in v.split(",")}
    if len(parts) != 1:
        raise Refused(400, "conflicting Content-Length values", param="Content-Length")
    text = parts.pop()
    if not _DIGITS.match(text):
        raise Refused(
            400, f"Content-Length {text[:40]!r} is not a number of bytes", param="Content-Length"
        )
    length = int(text)
    if length > limit:
        raise Refused(413, f"request body of {length} bytes is over the {limit}-byte limit")
    return length


class HeaderDeadlines:
    """Drops connections that take longer than `seconds` to send a request line and headers.

    The socket timeout bounds each read, so a client that trickles a byte just before each
    timeout would hold its connection (and thread) forever; a few such clients would use up
    every connection slot. One daemon thread, started on first use, shuts those sockets down.
    A kept-alive connection waiting for its next request counts as reading headers too.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._due: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, sock: socket.socket) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + self.seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="api-reaper", daemon=True)
                self._thread.start()

    def done(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(min(1.0, self.seconds / 4)):
            now = time.monotonic()
            with self._lock:
                late = [s for s, due in self._due.items() if due < now]
                for s in late:
                    del self._due[s]
            for s in late:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
