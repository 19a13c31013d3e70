"""The device API client: enroll once, then check in with If-None-Match.

This is the agent's only network seam to the control plane. Failures are sorted so the loop
can act on them: `Unreachable` (connection refused, timeout, 5xx: back off and retry forever),
`Rejected` (the server understood and said no: 401 means the credential is gone, 4xx a bug or
a version mismatch). The credential is written to ``DATA/credential`` atomically with mode
0600 before it is used, so a crash right after enrolling does not enroll the box twice.

Standard library HTTP (http.client) on one kept-alive connection: an idle agent does a small
POST a minute, and httpx (with h11, httpcore, its CLI's rich and click, and a CA bundle loaded
per client) was the largest part of the idle agent's memory. TLS verifies against the system
store (or ``SSL_CERT_FILE``); ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` are honoured (never
for loopback). The ``ssl`` module is imported only for https servers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import ValidationError

from slmops.core.atomic import atomic_open
from slmops.core.errors import SlmopsError
from slmops.protocol.device import (
    ActionReport,
    ActionStatus,
    CheckIn,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
)

CREDENTIAL_FILE = "credential"
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


class Unreachable(SlmopsError):
    """The server could not be reached or failed (network, timeout, 5xx): retry later."""


class Rejected(SlmopsError):
    """The server refused the request (4xx): retrying the same request will not help."""

    def __init__(self, status: int, message: str, *, hint: str | None = None) -> None:
        self.status = status
        super().__init__(message, where=f"HTTP {status}", hint=hint)


@dataclass(frozen=True)
class CheckInResult:
    desired: DesiredState | None  # None: 304, unchanged since the ETag we sent
    etag: str | None


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased
    content: bytes


def _error_text(resp: Reply) -> tuple[str, str | None]:
    """Message and hint from the server's JSON error envelope (or the raw body)."""
    text = resp.content.decode("utf-8", errors="replace")
    try:
        err = json.loads(text).get("error") or {}
        return str(err.get("message") or text[:300]), err.get("hint")
    except (ValueError, AttributeError):
        return text[:300] or resp.reason, None


def _proxy_for(scheme: str, host: str) -> tuple[str, int] | None:
    """The proxy (host, port) the environment names for this server, if any."""
    if host in _LOOPBACK:
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


class _Http:
    """One kept-alive connection to the control plane, reopened when the server dropped it."""

    def __init__(self, base_url: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        self.scheme = parts.scheme or "http"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.proxy = _proxy_for(self.scheme, self.host)
        self.conn: http.client.HTTPConnection | None = None
        self.lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            import ssl

            ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)
            if self.proxy:
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    *self.proxy, timeout=self.timeout, context=ctx
                )
                conn.set_tunnel(self.host, self.port)
                return conn
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=ctx
            )
        if self.proxy:
            return http.client.HTTPConnection(*self.proxy, timeout=self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        target = self.prefix + path
        if self.proxy and self.scheme == "http":
            target = f"http://{self.host}:{self.port}{target}"
        with self.lock:
            for attempt in (0, 1):
                reused = self.conn is not None
                if self.conn is None:
                    self.conn = self._connect()
                try:
                    self.conn.request("POST", target, body=body, headers=headers)
                    resp = self.conn.getresponse()
                    content = resp.read()
                except (OSError, http.client.HTTPException):
                    self.close_locked()
                    # A kept-alive connection the server closed while we were idle fails on
                    # first use; that request never reached the server, so send it once more.
                    if reused and attempt == 0:
                        continue
                    raise
                if resp.will_close:
                    self.close_locked()
                hdrs = {k.lower(): v for k, v in resp.getheaders()}
                return Reply(resp.status, resp.reason, hdrs, content)
        raise AssertionError("unreachable")  # pragma: no cover

    def close_locked(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
            self.conn = None

    def close(self) -> None:
        with self.lock:
            self.close_locked()


class DeviceClient:
    def __init__(self, base_url: str, data_dir: Path, *, timeout: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.credential_path = Path(data_dir) / CREDENTIAL_FILE
        self.http = _Http(self.base_url, timeout)

    def close(self) -> None:
        self.http.close()

    # credential ------------------------------------------------------------------------------
    def credential(self) -> str | None:
        try:
            text = self.credential_path.read_text().strip()
        except OSError:
            return None
        return text or None

    def _save_credential(self, secret: str) -> None:
        with atomic_open(self.credential_path, mode=0o600) as fh:
            fh.write(secret.encode() + b"\n")
        with contextlib.suppress(OSError):
            os.chmod(self.credential_path, 0o600)

    # calls -----------------------------------------------------------------------------------
    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        hdrs = {"Content-Type": "application/json", "Accept": "application/json", **headers}
        try:
            resp = self.http.post(path, body, hdrs)
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}", where=self.base_url + path) from None
        if resp.status >= 500:
            msg, hint = _error_text(resp)
            raise Unreachable(f"server error {resp.status}: {msg}", where=path, hint=hint)
        if resp.status >= 400:
            msg, hint = _error_text(resp)
            raise Rejected(resp.status, f"{path}: {msg}", hint=hint)
        return resp

    def enroll(self, request: EnrollRequest) -> EnrollResponse:
        """Enroll and persist the credential (0600, atomic) before returning it."""
        body = request.model_dump_json(by_alias=True).encode()
        resp = self._post("/device/v1/enroll", body, {})
        try:
            enrolled = EnrollResponse.model_validate_json(resp.content)
        except ValidationError as exc:
            raise Unreachable(f"enroll answer is not an EnrollResponse: {exc}") from None
        self._save_credential(enrolled.credential)
        return enrolled

    def checkin(self, report: CheckIn, etag: str | None) -> CheckInResult:
        cred = self.credential()
        if cred is None:
            raise Rejected(401, "no device credential", hint="enroll first")
        headers = {"Authorization": f"Bearer {cred}"}
        if etag:
            headers["If-None-Match"] = etag
        resp = self._post(
            "/device/v1/checkin", report.model_dump_json(by_alias=True).encode(), headers
        )
        new_etag = resp.headers.get("etag")
        if resp.status == 304:
            return CheckInResult(None, new_etag or etag)
        try:
            desired = DesiredState.model_validate_json(resp.content)
        except ValidationError as exc:
            raise Unreachable(f"check-in answer is not a DesiredState: {exc}") from None
        return CheckInResult(desired, new_etag)

    def report_actions(self, actions: list[ActionStatus]) -> None:
        """Post action statuses between check-ins (install progress); 204 expected."""
        cred = self.credential()
        if cred is None:
            raise Rejected(401, "no device credential", hint="enroll first")
        body = ActionReport(actions=actions).model_dump_json().encode()
        self._post("/device/v1/actions", body, {"Authorization": f"Bearer {cred}"})

    def post_telemetry(self, payload: bytes) -> None:
        """Deliver one gzip-compressed TelemetryBatch (the outbox's bytes, sent as they are)."""
        cred = self.credential()
        if cred is None:
            raise Rejected(401, "no device credential", hint="enroll first")
        headers = {"Authorization": f"Bearer {cred}", "Content-Encoding": "gzip"}
        self._post("/device/v1/telemetry", payload, headers)
