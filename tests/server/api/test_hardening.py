"""Regression tests for the control plane's input hardening (issue 11, findings 2, 4, 5, 7, 8).

A real `slmops server run` subprocess (tests/control_plane.py) on SQLite: its pid gives the
RSS measured while 200 MiB bodies arrive. Each test here failed on the code before the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from control_plane import ControlPlane, inventory, wait_for
from factories.blueprints import MODEL
from factories.bundles import make_inputs
from helpers import free_port
from slmops.bundle.build import build_bundle
from slmops.bundle.media import ANN_BUNDLE_NAME, ANN_VERSION, MT_INDEX
from slmops.bundle.oci_ref import _REPO_RE, _TAG_RE, DIGEST_RE
from slmops.bundle.signing import init_keys, sign_bundle
from slmops.core.errors import ConfigError, UserInputError
from slmops.server.db.session import open_database
from slmops.server.settings import load_settings
from slmops.server.telemetry.tables import AlertRow

MiB = 1 << 20
FAKE_DEVICE = "slmd_" + "x" * 43
INVENTORY = inventory(profile="pi")


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(
        tmp_path_factory.mktemp("hardening"), env={"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2"}
    )
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def pushed(cp: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real bundle of MODEL:1.0.0 and one of another model, both pushed."""
    root = tmp_path_factory.mktemp("hardening-bundles")
    private, _ = init_keys(root / "keys")
    out: dict[str, Path] = {}
    for name in (MODEL, "other-model"):
        variants, report = make_inputs(root / f"in-{name}", None)
        built = build_bundle(variants, report, name=name, version="1.0.0", out=root / name)
        sign_bundle(built.path, private)
        cp.push(built.path, name, "1.0.0")
        out[name] = built.path
    return out


def envelope(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text[:500]
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"code", "message", "where", "hint"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def token(cp: ControlPlane, role: str) -> str:
    return str(cp.api("POST", "/api/v1/tokens", {"name": f"h-{role}", "role": role})["token"])


def enroll(cp: ControlPlane, device_id: str, **labels: str) -> str:
    body = {
        "enrollment_token": cp.enrollment_token(labels),
        "device_id": device_id,
        "inventory": INVENTORY | {"labels": labels},
    }
    r = httpx.post(cp.url + "/device/v1/enroll", json=body, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["credential"])


def check_in(cp: ControlPlane, cred: str, **extra: Any) -> httpx.Response:
    body = {"inventory": INVENTORY} | extra
    return httpx.post(
        cp.url + "/device/v1/checkin",
        json=body,
        headers={"Authorization": f"Bearer {cred}"},
        timeout=10,
    )


# --- 1. body limits ----------------------------------------------------------------------------


def _zeros(total: int) -> Iterator[bytes]:
    piece = b"0" * MiB
    for _ in range(total // MiB):
        yield piece


class PeakRss:
    """The server process's peak RSS growth while the block runs (sampled every 5 ms)."""

    def __init__(self, pid: int) -> None:
        self.proc, self.peak, self.base = psutil.Process(pid), 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        self.base = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # whatever the server still does with the body
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def test_200_mib_bodies_are_refused_without_growing_the_server(cp: ControlPlane) -> None:
    assert cp.proc is not None
    digest = "sha256:" + "0" * 64
    cases = [
        ("/device/v1/checkin", {"Authorization": f"Bearer {FAKE_DEVICE}"}, {401, 413}),
        ("/api/v1/tokens", {}, {401, 413}),
        ("/device/v1/enroll", {}, {413}),
        ("/ui/login", {"Content-Type": "application/x-www-form-urlencoded"}, {403, 413}),
        (
            f"/v2/{MODEL}/blobs/uploads/?digest={digest}",
            {"Authorization": f"Bearer {enroll(cp, 'rss-dev')}"},
            {403},
        ),
    ]
    growth: dict[str, int] = {}
    for path, headers, expected in cases:
        with PeakRss(cp.proc.pid) as rss:
            r = httpx.post(cp.url + path, content=_zeros(200 * MiB), headers=headers, timeout=60)
        assert r.status_code in expected, (path, r.status_code, r.text[:300])
        if r.status_code == 413:
            envelope(r, 413, "payload_too_large")
        growth[path] = rss.growth
    print("peak RSS growth per route (bytes):", growth)
    assert all(g < 10 * MiB for g in growth.values()), growth

    # a declared Content-Length over the limit is refused before anything is read
    began = time.monotonic()
    with PeakRss(cp.proc.pid) as rss:
        r = httpx.post(
            cp.url + "/api/v1/tokens",
            content=_zeros(200 * MiB),
            headers={"Content-Length": str(200 * MiB)},
            timeout=60,
        )
    envelope(r, 413, "payload_too_large")
    assert rss.growth < 10 * MiB and time.monotonic() - began < 30
    assert httpx.get(cp.url + "/healthz").status_code == 200


def test_inventory_is_strict_and_bounded(cp: ControlPlane) -> None:
    cred = enroll(cp, "inv-1")
    assert check_in(cp, cred).status_code == 200
    for bad in (
        {"free_disk_bytes": False},
        {"cores": 1.5},
        {"ram_bytes": "8"},
        {"labels": {f"k{i}": "v" for i in range(65)}},
        {"labels": {"k" * 64: "v"}},
        {"labels": {"k": "v" * 129}},
        {"arch": "a" * 65},
    ):
        r = check_in(cp, cred, inventory=INVENTORY | bad)
        envelope(r, 422, "invalid_request")
    body = {
        "enrollment_token": cp.enrollment_token(),
        "device_id": "inv-2",
        "inventory": INVENTORY | {"free_disk_bytes": False},
    }
    envelope(httpx.post(cp.url + "/device/v1/enroll", json=body, timeout=10), 422)


# --- 2. registry reads are scoped to the device's own bundle -----------------------------------


def _manifest(cp: ControlPlane, cred: str, repo: str, ref: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {cred}", "Accept": MT_INDEX}
    return httpx.get(f"{cp.url}/v2/{repo}/manifests/{ref}", headers=headers, timeout=10)


def test_a_device_reads_only_its_own_bundle(cp: ControlPlane, pushed: dict[str, Path]) -> None:
    mine = enroll(cp, "scope-a", team="scope")
    theirs = enroll(cp, "scope-b", team="elsewhere")
    spec = {
        "selector": {"team": "scope"},
        "model": {"name": MODEL, "version": "1.0.0"},
        "rollout": {"waves": [{"percent": 100}], "gates": {"min_soak_seconds": 0}},
    }
    cp.apply("scope", spec)

    def desired() -> dict[str, Any] | None:
        doc: dict[str, Any] = check_in(cp, mine, inventory=INVENTORY | {"labels": {}}).json()
        return doc if doc.get("model") else None

    model = wait_for("a desired model", desired)["model"]
    assert check_in(cp, theirs).json()["model"] is None

    own = _manifest(cp, mine, MODEL, "1.0.0")
    assert own.status_code == 200, own.text
    variant = _manifest(cp, mine, MODEL, model["manifest_digest"])
    assert variant.status_code == 200
    layer = json.loads(variant.content)["layers"][0]["digest"]
    blob = httpx.get(
        f"{cp.url}/v2/{MODEL}/blobs/{layer}",
        headers={"Authorization": f"Bearer {mine}"},
        timeout=10,
    )
    assert blob.status_code == 200
    assert _manifest(cp, mine, MODEL, model["bundle_digest"].replace(":", "-")).status_code == 200

    other = _manifest(cp, mine, "other-model", "1.0.0")  # another repository
    assert other.status_code == 403 and other.json()["errors"][0]["code"] == "DENIED"
    for ref in ("1.0.0", model["manifest_digest"]):  # a device without that bundle
        denied = _manifest(cp, theirs, MODEL, ref)
        assert denied.status_code == 403, denied.text
    r = httpx.get(
        f"{cp.url}/v2/{MODEL}/blobs/{layer}",
        headers={"Authorization": f"Bearer {theirs}"},
        timeout=10,
    )
    assert r.status_code == 403
    tags = httpx.get(
        f"{cp.url}/v2/other-model/tags/list",
        headers={"Authorization": f"Bearer {mine}"},
        timeout=10,
    )
    assert tags.status_code == 403
    assert _manifest(cp, token(cp, "viewer"), "other-model", "1.0.0").status_code == 200
    # claiming to run a model the server never assigned opens nothing (the claim is unchecked)
    claim = {"name": MODEL, "version": "1.0.0", "variant": "q8", "digest": "sha256:" + "1" * 64}
    assert check_in(cp, theirs, active=claim).status_code in (200, 304)
    for ref in ("1.0.0", model["manifest_digest"]):
        assert _manifest(cp, theirs, MODEL, ref).status_code == 403


# --- 3. telemetry values --------------------------------------------------------------------------


def _window(start: float, **over: Any) -> dict[str, Any]:
    return {
        "start": start,
        "end": start + 60,
        "model": MODEL,
        "version": "1.0.0",
        "variant": "q8",
        "requests": 3,
    } | over


def _post_raw(cp: ControlPlane, cred: str, text: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {cred}", "Content-Encoding": "gzip"}
    return httpx.post(
        cp.url + "/device/v1/telemetry", content=gzip.compress(text.encode()), headers=headers
    )


def _batch(*windows: dict[str, Any]) -> str:
    doc = {"schema": "slmops.telemetry/v1", "batch_id": uuid.uuid4().hex, "windows": windows}
    return json.dumps(doc)


def test_telemetry_values_are_validated_and_attributed_by_the_server(cp: ControlPlane) -> None:
    cred = enroll(cp, "tel-1")
    active = {"name": MODEL, "version": "1.0.0", "variant": "q8", "digest": "sha256:" + "1" * 64}
    assert check_in(cp, cred, active=active).status_code == 200
    now = time.time() - 120
    for bad in ('"requests": NaN', '"requests": Infinity', '"prompt_tokens": -Infinity'):
        text = _batch(_window(now)).replace('"requests": 3', bad)
        envelope(_post_raw(cp, cred, text), 422, "invalid_request")
    for over in (
        {"requests": -1},
        {"errors": {"made_up": 1}},
        {"errors": {"runtime": -2}},
        {"peak_rss_bytes": -5},
        {"requests": 1e300},
    ):
        envelope(_post_raw(cp, cred, _batch(_window(now, **over))), 422, "invalid_request")
    metrics = httpx.get(cp.url + "/metrics").text
    assert "+Inf\n" not in metrics.replace('le="+Inf"', "") and "NaN" not in metrics

    # clock skew: a window from two days ago or an hour ahead is not stored
    r = _post_raw(
        cp,
        cred,
        _batch(_window(now), _window(now - 2 * 86400), _window(time.time() + 3600)),
    )
    assert r.status_code == 200 and (r.json()["accepted"], r.json()["skipped"]) == (1, 2)

    # attribution: a window claiming another model/rollout is not filed under it
    lie = _window(now, model="other-model", rollout_id="someone-elses", requests=7)
    assert _post_raw(cp, cred, _batch(lie)).status_code == 200
    viewer = token(cp, "viewer")
    r = httpx.get(
        cp.url + "/api/v1/telemetry",
        params={"group_by": ["model", "rollout_id"], "where": "device_id=tel-1"},
        headers={"Authorization": f"Bearer {viewer}"},
    )
    rows = {(g["model"], g["rollout_id"]): g["requests"] for g in r.json()["data"]}
    assert ("other-model", "someone-elses") not in rows and rows.get((MODEL, None)) == 3, rows
    assert sum(rows.values()) == 10  # the lie is kept, unattributed


def test_cohorts_leave_out_windows_of_another_hardware_class() -> None:
    """A rollout device that reports another profile cannot file its figures into that class's
    comparison; devices outside the rollout count only for classes the rollout has."""
    from slmops.server.rollouts.machine import (
        DeviceReport,
        DevicesMatched,
        MatchedDevice,
        OperatorAction,
        OperatorCommand,
        create_rollout,
        step,
    )
    from slmops.server.rollouts.machine.gates import Cohort
    from slmops.server.telemetry.cohorts import classifier

    now = time.time()
    state = create_rollout("hw-r", "1.1.0", now=now)
    matched = [
        MatchedDevice(device_id=d, hardware_class="rpi5", current_version="1.0.0")
        for d in ("hw-1", "hw-2")
    ]
    state, _ = step(state, DevicesMatched(devices=matched), now)
    state, _ = step(state, OperatorCommand(action=OperatorAction.START, actor="t"), now)
    for moved in state.assigned:
        state, _ = step(state, DeviceReport(device_id=moved, state="active"), now)
    cohort = classifier(state, "m")
    canary = next(iter(state.assigned))
    assert cohort(canary, "m", "1.1.0", "rpi5") is Cohort.CANARY
    assert cohort(canary, "m", "1.1.0", "jetson") is None
    assert cohort("outsider", "m", "1.0.0", "rpi5") is Cohort.BASELINE
    assert cohort("outsider", "m", "1.0.0", "jetson") is None


# --- 4. webhooks ----------------------------------------------------------------------------------


def test_webhooks_to_loopback_are_refused_and_viewers_see_only_the_outcome(
    cp: ControlPlane,
) -> None:
    hits: list[str] = []
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
        rules = {"rules": [{"name": "h", "match": {"statistic": "hk"}, "actions": []}]}
        rules["rules"][0]["actions"] = [{"notify": {"url": url}}]
        doc = {"apiVersion": "slmops/v1", "kind": "FeedbackRules", "metadata": {"name": "hk"}}
        cp.api("PUT", "/api/v1/feedback-rules/hk", doc | {"spec": rules})
        db = open_database(load_settings(data_dir=cp.data))
        with db.sessions() as session:
            alert = AlertRow(
                kind="drift",
                model=MODEL,
                version="1.0.0",
                profile="pi",
                statistic="hk",
                value=1.0,
                threshold=0.2,
                details={},
            )
            session.add(alert)
            session.commit()
            alert_id = alert.id
        db.dispose()

        def finished(tok: str) -> list[dict[str, Any]] | None:
            r = httpx.get(
                cp.url + "/api/v1/alert-actions",
                params={"alert_id": alert_id},
                headers={"Authorization": f"Bearer {tok}"},
            )
            rows: list[dict[str, Any]] = r.json()["data"]
            return rows if rows and "sending" not in rows[0]["detail"] else None

        [full] = wait_for("the webhook's outcome", lambda: finished(cp.admin))
        assert full["ok"] is False and "internal address" in full["detail"], full
        [seen] = finished(token(cp, "viewer")) or []
        assert seen["detail"] == "webhook failed"
        assert hits == []
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- 5. smaller ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["::0", "0", "0.0.0.0.", "::", "0.0.0.0", "[::]", "0x0", ""])
def test_every_spelling_of_all_interfaces_is_refused(host: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="every interface"):
        load_settings(data_dir=tmp_path, host=host)
    assert load_settings(data_dir=tmp_path, host=host, allow_public=True).allow_public
    assert not load_settings(data_dir=tmp_path, host="127.0.0.1").allow_public


def test_server_run_refuses_host_colon_zero(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "slmops.cli.server",
            "run",
            "--data",
            str(tmp_path),
            "--host",
            "::0",
            "--port",
            str(free_port()),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "every interface" in res.stdout + res.stderr


def test_patterns_do_not_accept_a_trailing_newline() -> None:
    digest = "sha256:" + "a" * 64
    assert DIGEST_RE.match(digest) and not DIGEST_RE.match(digest + "\n")
    assert _REPO_RE.match("acme/bot") and not _REPO_RE.match("acme/bot\n")
    assert _TAG_RE.match("1.0.0") and not _TAG_RE.match("1.0.0\n")


def test_malformed_index_and_huge_ids_are_4xx(cp: ControlPlane) -> None:
    index = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": 5}).encode()
    r = httpx.put(
        f"{cp.url}/v2/junk/manifests/1",
        content=index,
        headers={"Authorization": f"Bearer {cp.admin}", "Content-Type": MT_INDEX},
    )
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    big = str(2**63)
    auth = {"Authorization": f"Bearer {cp.admin}"}
    for method, path, params in (
        ("GET", "/api/v1/alert-actions", {"alert_id": big}),
        ("POST", f"/api/v1/alerts/{big}/ack", None),
        ("GET", f"/api/v1/jobs/{big}", None),
        ("POST", f"/api/v1/jobs/{big}/result", None),
    ):
        body = {"ok": False} if path.endswith("result") else None
        r = httpx.request(method, cp.url + path, params=params, json=body, headers=auth)
        assert r.status_code in (404, 422), (path, r.status_code, r.text)
        envelope(r, r.status_code)


# --- 6. push under the signed name only ----------------------------------------------------------


def test_push_refuses_another_name_or_version(cp: ControlPlane, pushed: dict[str, Path]) -> None:
    from slmops.bundle.registry import push

    bundle = pushed[MODEL]
    before = {p.name for p in (cp.data / "blobs" / "sha256").iterdir()}
    address = cp.url.removeprefix("http://")
    for ref in (f"oci://{address}/trial:1.0.0", f"oci://{address}/{MODEL}:9.9.9"):
        with pytest.raises(UserInputError, match="signed as"):
            push(bundle, ref, token=cp.admin)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "slmops.cli.main",
            "push",
            str(bundle),
            f"oci://{address}/trial:1.0.0",
            "--token",
            cp.admin,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert {p.name for p in (cp.data / "blobs" / "sha256").iterdir()} == before

    # the registry refuses such an index too (a client that does not check)
    index_digest = json.loads((bundle / "index.json").read_text())["manifests"][0]["digest"]
    data = (bundle / "blobs" / "sha256" / index_digest.split(":")[1]).read_bytes()
    notes = json.loads(data)["annotations"]
    assert (notes[ANN_BUNDLE_NAME], notes[ANN_VERSION]) == (MODEL, "1.0.0")
    r = httpx.put(
        f"{cp.url}/v2/trial/manifests/1.0.0",
        content=data,
        headers={"Authorization": f"Bearer {cp.admin}", "Content-Type": MT_INDEX},
    )
    assert r.status_code == 400 and "signed as" in r.json()["errors"][0]["message"]
    assert hashlib.sha256(data).hexdigest() == index_digest.split(":")[1]
