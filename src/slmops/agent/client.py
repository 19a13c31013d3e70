"""The device API client: enroll once, then check in with If-None-Match.

This is the agent's only network seam to the control plane. Failures are sorted so the loop
can act on them: `Unreachable` (connection refused, timeout, 5xx: back off and retry forever),
`Rejected` (the server understood and said no: 401 means the credential is gone, 4xx a bug or
a version mismatch). The credential is written to ``DATA/credential`` atomically with mode
0600 before it is used, so a crash right after enrolling does not enroll the box twice.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
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


def _error_text(resp: httpx.Response) -> tuple[str, str | None]:
    """Message and hint from the server's JSON error envelope (or the raw body)."""
    try:
        err = resp.json().get("error") or {}
        return str(err.get("message") or resp.text[:300]), err.get("hint")
    except (ValueError, AttributeError):
        return resp.text[:300] or resp.reason_phrase, None


class DeviceClient:
    def __init__(self, base_url: str, data_dir: Path, *, timeout: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.credential_path = Path(data_dir) / CREDENTIAL_FILE
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)

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
    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        try:
            resp = self.http.post(
                path, content=body, headers={"Content-Type": "application/json", **headers}
            )
        except httpx.HTTPError as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}", where=self.base_url + path) from None
        if resp.status_code >= 500:
            msg, hint = _error_text(resp)
            raise Unreachable(f"server error {resp.status_code}: {msg}", where=path, hint=hint)
        if resp.status_code >= 400:
            msg, hint = _error_text(resp)
            raise Rejected(resp.status_code, f"{path}: {msg}", hint=hint)
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
        new_etag = resp.headers.get("ETag")
        if resp.status_code == 304:
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
