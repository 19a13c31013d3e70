"""Telemetry batches stored and answered before routing (server/api/device/fast_telemetry.py).

Two real uvicorns in this process on one SQLite database: the app as built, and the same app
without the fast layer. A well-formed batch (gzip or plain, in one piece or in many) is stored
and answered without reaching the route (the route's ``parse_batch`` is counted), with the
route's body and headers, and a retry is a duplicate. Every refusal (malformed or unknown
credential, unsupported encoding, bad gzip, a batch that does not validate, NaN, NUL in a
string, a body or an inflated body over its limit) reaches the route and gets, byte for byte,
the answer the app without the layer gives; an unknown device's refusal is handed over, so the
route does not parse and look it up again.
"""

from __future__ import annotations

import gzip
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from factories.inproc import served_in_thread
from factories.server import Server, cli_json, credential, enrollment_token
from slmops.server.api.device.fast_telemetry import FastTelemetry
from slmops.server.app import create_app
from slmops.server.settings import load_settings
from slmops.server.telemetry import ingest
from slmops.server.telemetry.tables import TelemetryBatchRow


@dataclass
class Both:
    fast: str
    slow: str
    cred: str
    route_calls: list[int]
    db: Any


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Both]:
    data: Path = tmp_path_factory.mktemp("fasttel")
    admin = cli_json("token", "create", "--data", data, "--role", "admin", "--name", "root")
    fast_app = create_app(load_settings(data_dir=data))
    slow_app = create_app(load_settings(data_dir=data))
    slow_app.user_middleware = [m for m in slow_app.user_middleware if m.cls is not FastTelemetry]
    calls: list[int] = []
    real = ingest.parse_batch

    def counted(body: bytes) -> Any:
        calls.append(1)
        return real(body)

    mp = pytest.MonkeyPatch()
    mp.setattr(ingest, "parse_batch", counted)  # the route's calls only (the layer holds its own)
    try:
        with served_in_thread(fast_app) as (fast, _), served_in_thread(slow_app) as (slow, _):
            server = Server(fast, data, admin["token"])
            cred = credential(server, enrollment_token(server, {"site": "fast"}), "tel-fast")
            yield Both(fast, slow, cred, calls, fast_app.state.db)
    finally:
        mp.undo()


def _batch(**over: Any) -> dict[str, Any]:
    start = time.time() - 600
    window = {
        "start": start,
        "end": start + 300,
        "model": "m",
        "version": "1.0.0",
        "variant": "q4",
        "requests": 3,
    }
    return {"schema": "slmops.telemetry/v1", "batch_id": uuid.uuid4().hex, "windows": [window]}


def _post(url: str, cred: str, content: Any, encoding: str | None = "gzip") -> httpx.Response:
    headers = {"Authorization": f"Bearer {cred}"}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return httpx.post(url + "/device/v1/telemetry", content=content, headers=headers, timeout=30)


def _chunks(raw: bytes, size: int) -> Iterator[bytes]:
    yield from (raw[i : i + size] for i in range(0, len(raw), size))


def _stored(db: Any, batch_id: str) -> int:
    with db.sessions() as session:
        rows = session.query(TelemetryBatchRow).filter_by(batch_id=batch_id).all()
        return sum(r.windows for r in rows)


def test_a_well_formed_batch_is_stored_without_reaching_the_route(both: Both) -> None:
    calls = len(both.route_calls)
    doc = _batch()
    raw = json.dumps(doc).encode()
    r = _post(both.fast, both.cred, gzip.compress(raw))
    assert r.status_code == 200, r.text
    want = {"batch_id": doc["batch_id"], "accepted": 1, "duplicate": False, "skipped": 0}
    assert r.json() == want
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    assert _stored(both.db, doc["batch_id"]) == 1

    again = _post(both.fast, both.cred, _chunks(gzip.compress(raw), 9))  # a retry, in pieces
    assert again.json() == want | {"accepted": 0, "duplicate": True}
    plain = _batch()
    r = _post(both.fast, both.cred, json.dumps(plain).encode(), encoding=None)
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert _stored(both.db, plain["batch_id"]) == 1
    assert len(both.route_calls) == calls  # the route never ran

    # The same batch through the route (app without the layer) answers the same document.
    other = _batch()
    body = gzip.compress(json.dumps(other).encode())
    slow = _post(both.slow, both.cred, body)
    assert slow.status_code == 200
    assert slow.json() == want | {"batch_id": other["batch_id"]}
    assert slow.headers["content-type"] == r.headers["content-type"]
    assert len(both.route_calls) == calls + 1


def _bomb() -> bytes:
    return gzip.compress(b" " * (ingest.MAX_JSON + 1024) + json.dumps(_batch()).encode())


REFUSED: dict[str, tuple[str | None, Any, str | None, int]] = {
    # name: (credential (None: the enrolled one), body, Content-Encoding, status)
    "malformed credential": ("not-a-credential", lambda: gzip.compress(b"{}"), "gzip", 401),
    "unknown device": (
        "slmd_" + "x" * 43,
        lambda: gzip.compress(json.dumps(_batch()).encode()),
        "gzip",
        401,
    ),
    "unsupported encoding": (None, lambda: b"{}", "br", 415),
    "bad gzip": (None, lambda: b"\x1f\x8b not gzip at all", "gzip", 400),
    "truncated gzip": (
        None,
        lambda: gzip.compress(json.dumps(_batch()).encode())[:-12],
        "gzip",
        400,
    ),
    "invalid batch": (
        None,
        lambda: gzip.compress(b'{"schema": "slmops.telemetry/v1"}'),
        "gzip",
        422,
    ),
    "unknown key": (None, lambda: json.dumps(_batch() | {"extra": 1}).encode(), None, 422),
    "NaN": (
        None,
        lambda: json.dumps(_batch()).replace('"requests": 3', '"requests": NaN').encode(),
        None,
        422,
    ),
    "NUL in a window string": (
        None,
        lambda: json.dumps(_batch()).replace('"model": "m"', '"model": "m\\u0000"').encode(),
        None,
        422,
    ),
    "inflated over the limit": (None, _bomb, "gzip", 413),
    "body over the limit": (None, lambda: b"x" * (ingest.MAX_BODY + 10), None, 413),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_reach_the_route_and_get_its_answer(both: Both, case: str) -> None:
    cred, make, encoding, status = REFUSED[case]
    body = make()
    calls = len(both.route_calls)
    fast = _post(both.fast, cred or both.cred, body, encoding)
    slow = _post(both.slow, cred or both.cred, body, encoding)
    assert fast.status_code == status, fast.text
    assert (fast.status_code, fast.json()) == (slow.status_code, slow.json())
    # a chunked body (no Content-Length) is read by the layer first, then replayed
    chunked = _post(both.fast, cred or both.cred, _chunks(body, 4096), encoding)
    assert (chunked.status_code, chunked.json()["error"]["code"]) == (
        status,
        fast.json()["error"]["code"],
    )
    # the route parsed the body (fast app, slow app, chunked) wherever it gets that far; an
    # unknown device's refusal is handed to the route, which does not parse again (slow app)
    parsed = case in ("invalid batch", "unknown key", "NaN", "NUL in a window string")
    expected = 3 if parsed else 1 if case == "unknown device" else 0
    assert len(both.route_calls) == calls + expected
