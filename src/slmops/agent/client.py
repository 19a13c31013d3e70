"""The device API client: enroll once, then check in with If-None-Match.

This is the agent's only network seam to the control plane. Failures are sorted so the loop
can act on them: `Unreachable` (connection refused, timeout, 5xx: back off and retry forever),
`Rejected` (the server understood and said no: 401 means the credential is gone, 4xx a bug or
a version mismatch). The credential is written to ``DATA/credential`` atomically with mode
0600 before it is used, so a crash right after enrolling does not enroll the box twice.

HTTP goes through the agent's one transport (transport.py: standard library, kept-alive
connections, the same proxy and TLS rules as registry pulls); tests pass a FakeTransport.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from slmops.agent.transport import HttpTransport, Transport, TransportError
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


class Unreachable(SlmopsError):
    """The server could not be reached or failed (network, timeout, 5xx): retry later."""


class Rejected(SlmopsError):
    """The server refused the request (4xx): retrying the same request will not help."""

    def __init__(self, status: int, message: str, *, hint: str | None = None) -> None:
        self.status = status
        super().__init__(message, where=f"HTTP {status}", hint=hint)


class PendingApproval(Rejected):
    """The server holds this re-enrollment for an operator (202). The pending credential is
    saved: it starts working once approved, and enrolling again with it asks again."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(202, message, hint=hint)


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


class _Http:
    """POSTs to the control plane through the agent's one transport (transport.py)."""

    def __init__(self, base_url: str, timeout: float, transport: Transport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.transport: Transport = transport or HttpTransport(timeout=timeout)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        resp = self.transport.request("POST", self.base_url + path, headers, body)
        return Reply(resp.status, resp.reason, resp.headers, resp.read())

    def close(self) -> None:
        self.transport.close()


class DeviceClient:
    def __init__(
        self,
        base_url: str,
        data_dir: Path,
        *,
        timeout: float = 15.0,
        transport: Transport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credential_path = Path(data_dir) / CREDENTIAL_FILE
        self.http = _Http(self.base_url, timeout, transport)

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
        except TransportError as exc:
            raise Unreachable(exc.message, where=self.base_url + path) from None
        if resp.status >= 500:
            msg, hint = _error_text(resp)
            raise Unreachable(f"server error {resp.status}: {msg}", where=path, hint=hint)
        if resp.status >= 400:
            msg, hint = _error_text(resp)
            raise Rejected(resp.status, f"{path}: {msg}", hint=hint)
        return resp

    def enroll(self, request: EnrollRequest) -> EnrollResponse:
        """Enroll and persist the credential (0600, atomic) before returning it.

        Raises ``PendingApproval`` (after saving the pending credential) when the server waits
        for an operator: the id exists and the request could not prove to be that device."""
        body = request.model_dump_json(by_alias=True).encode()
        resp = self._post("/device/v1/enroll", body, {})
        enrolled = self._credential_answer(resp, "enroll")
        if resp.status == 202 or enrolled.status == "pending":
            raise PendingApproval(
                f"enrollment of {enrolled.device_id} is pending operator approval "
                f"(request {enrolled.request_id})",
                hint=f"an operator runs: slmops devices approve {enrolled.device_id}",
            )
        return enrolled

    def rotate_credential(self) -> EnrollResponse:
        """Trade the current credential for a new one (POST /device/v1/credential)."""
        cred = self.credential()
        if cred is None:
            raise Rejected(401, "no device credential", hint="enroll first")
        resp = self._post("/device/v1/credential", b"", {"Authorization": f"Bearer {cred}"})
        return self._credential_answer(resp, "credential")

    def _credential_answer(self, resp: Reply, what: str) -> EnrollResponse:
        try:
            answer = EnrollResponse.model_validate_json(resp.content)
        except ValidationError as exc:
            raise Unreachable(f"{what} answer is not an EnrollResponse: {exc}") from None
        self._save_credential(answer.credential)
        return answer

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
