"""The check-in's idle path (server/checkin.py, server/checkin_reader.py) against a real server.

With the check-in cache off, an idle check-in is answered from the stored row (one batched
read, no recomputation) and its ``last_seen`` is written by the batched flush. What must still
be recomputed is: a device that re-enrolled with new labels (its stored labels then equal what
it reports, so only the cleared ETag tells), and one whose report changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from control_plane import ControlPlane, inventory, wait_for


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    env = {"SLMOPS_CHECKIN_CACHE_SECONDS": "0", "SLMOPS_POLL_SECONDS": "2"}  # last_seen: 1 s
    plane = ControlPlane(tmp_path_factory.mktemp("paths"), env)
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


def _checkin(cp: ControlPlane, cred: str, inv: dict[str, Any], etag: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {cred}", "If-None-Match": etag}
    body = {"schema": "slmops.device/v1", "inventory": inv}
    return httpx.post(cp.url + "/device/v1/checkin", json=body, headers=headers, timeout=10)


def _enroll(cp: ControlPlane, body: dict[str, Any]) -> str:
    r = httpx.post(cp.url + "/device/v1/enroll", json=body, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["credential"])


def test_reenrolled_labels_are_not_answered_from_the_stored_state(cp: ControlPlane) -> None:
    token = cp.enrollment_token()
    inv_a = inventory(labels={"site": "a"})
    cred = _enroll(cp, {"enrollment_token": token, "device_id": "re-1", "inventory": inv_a})
    first = _checkin(cp, cred, inv_a)
    assert first.status_code == 200 and not first.json().get("unplaceable")
    etag = first.headers["etag"]
    assert _checkin(cp, cred, inv_a, etag).status_code == 304  # idle
    spec = {"selector": {"site": "b"}, "model": {"name": "assistant", "channel": "none"}}
    cp.apply("site-b", spec)
    assert _checkin(cp, cred, inv_a, etag).status_code == 304  # not governed: unchanged

    # The device re-enrolls itself (current credential) reporting site=b: the row now holds
    # what its next check-in reports, yet the blueprint for site=b governs it.
    inv_b = inventory(labels={"site": "b"})
    body = {"enrollment_token": token, "device_id": "re-1", "inventory": inv_b, "credential": cred}
    cred = _enroll(cp, body)
    r = _checkin(cp, cred, inv_b, etag)
    assert r.status_code == 200, r.text
    assert "assistant" in r.json()["unplaceable"]

    # A changed report takes the full path too: back to site=a, the blueprint lets go.
    r = _checkin(cp, cred, inv_a, r.headers["etag"])
    assert r.status_code == 200 and not r.json().get("unplaceable")
    assert r.headers["etag"] == etag


def test_idle_checkins_write_last_seen_in_a_batched_flush(cp: ControlPlane) -> None:
    inv = inventory(labels={"site": "c"})
    body = {"enrollment_token": cp.enrollment_token(), "device_id": "seen-1", "inventory": inv}
    cred = _enroll(cp, body)
    etag = _checkin(cp, cred, inv).headers["etag"]

    def seen() -> datetime:
        return datetime.fromisoformat(cp.device("seen-1")["last_seen"])

    before = seen()
    wait_for("half a poll", lambda: (datetime.now(before.tzinfo) - before).total_seconds() > 1.2)
    assert _checkin(cp, cred, inv, etag).status_code == 304
    # written by the reader's next flush (every second), not by the request itself
    wait_for("last_seen to move", lambda: seen() > before, timeout=5)


def test_unknown_credential_is_refused_on_the_idle_path(cp: ControlPlane) -> None:
    r = _checkin(cp, "slmd_" + "x" * 40, inventory())
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
