"""Telemetry end to end: a real `slmops server run` (SQLite; one test on PostgreSQL), devices
delivering gzip batches, operator queries, rollout cohorts and a metric gate, drift, /metrics.

Expected numbers are computed here from the raw per-request values the windows were built from,
not with the server's merging code.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from factories.server import (
    Server,
    _server,
    assert_envelope,
    make_token,
)
from factories.telemetry import (
    HOUR,
    batch,
    check_in,
    device,
    hist,
    in_bucket,
    post,
    query,
    window,
)
from slmops.protocol.telemetry import BOUNDS
from slmops.server.context import Context
from slmops.server.db.session import Database, open_database
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts.machine import (
    DeviceReport,
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RolloutPolicy,
    RolloutState,
    create_rollout,
    step,
)
from slmops.server.rollouts.tables import Rollout
from slmops.server.settings import load_settings
from slmops.server.telemetry import aggregate
from slmops.server.telemetry.cohorts import feed_metrics, figures_for
from slmops.server.telemetry.drift import check_drift, psi
from slmops.server.telemetry.query import summarize


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The tests feed metrics and tick themselves: the server's own ticker, every few seconds,
    # would race them (rolling a canary back between two reads of the same figures).
    yield from _server(tmp_path_factory, env={"SLMOPS_ROLLOUT_TICK_SECONDS": "3600"})


@pytest.fixture
def db(server: Server) -> Iterator[Database]:
    database = open_database(load_settings(data_dir=server.data))
    yield database
    database.dispose()


# --- building batches from raw per-request values --------------------------------------------


# --- pure parts ------------------------------------------------------------------------------


def test_quantile_interpolates_inside_the_bucket_and_merge_adds() -> None:
    counts = [0.0] * 12
    counts[3] = 10  # (50, 100]
    counts[4] = 10  # (100, 250]
    assert aggregate.quantile("latency_ms", counts, 0.5) == pytest.approx(100)
    assert aggregate.quantile("latency_ms", counts, 0.25) == pytest.approx(75)
    assert aggregate.quantile("latency_ms", counts, 0.95) == pytest.approx(100 + 150 * 0.9)
    counts[-1] = 100
    assert aggregate.quantile("latency_ms", counts, 0.95) == 30000  # open last bucket
    a = aggregate.from_window(window(0, version="1", latency=[60, 70], logprobs=[-1.0]))
    b = aggregate.from_window(window(0, version="1", latency=[200], logprobs=[-2.0, -4.0]))
    both = aggregate.figures(aggregate.merge(a, b))
    assert both["requests"] == 3 and both["logprob_mean"] == pytest.approx(-7 / 3)
    assert psi([10, 20, 30], [10, 20, 30]) == 0
    assert psi([10, 20, 0], [0, 20, 30]) > 1


def test_merge_into_adds_in_place_and_leaves_the_other_alone() -> None:
    """The ingestion path merges windows into accumulators it owns (``merge_into``): the result
    must equal ``merge``'s, and the window merged in (or an hourly row read with it) must not
    change, nor share lists with the result that a later merge would then change."""
    a = aggregate.from_window(window(0, version="1", latency=[60, 70], logprobs=[-1.0]))
    b = aggregate.from_window(window(0, version="1", latency=[200], logprobs=[-2.0, -4.0]))
    b["noised"], b["epsilon"], b["error_kinds"] = ["latency_ms"], 1.0, {"timeout": 2.0}
    b_before = copy.deepcopy(b)
    expected = aggregate.merge(a, b)
    acc = copy.deepcopy(a)
    assert aggregate.merge_into(acc, b) is acc
    assert acc == expected and b == b_before
    aggregate.merge_into(acc, b)  # again: b's histograms were copied, not aliased
    assert b == b_before and acc["requests"] == a["requests"] + 2 * b["requests"]
    assert acc["histograms"]["latency_ms"]["counts"] == [
        x + 2 * y
        for x, y in zip(
            a["histograms"]["latency_ms"]["counts"],
            b["histograms"]["latency_ms"]["counts"],
            strict=True,
        )
    ]
    old = {"windows": 1.0, "requests": 2}  # a row written before a figure existed
    assert aggregate.merge_into(old, b)["requests"] == 2 + b["requests"]
    assert old["noised"] == ["latency_ms"] and old["epsilon"] == 1.0


# --- ingestion -------------------------------------------------------------------------------


def test_gzip_ingest_is_idempotent_and_counted(server: Server) -> None:
    cred = device(server, "ing-1", "rpi5", runs=("9.0",))
    now = time.time()
    doc = batch(
        [
            window(now - 600, version="9.0", latency=[30, 40]),
            window(now - 300, version="9.0", latency=[45]),
        ],
        dropped=3,
    )
    first = post(server, cred, doc)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "batch_id": doc["batch_id"],
        "accepted": 2,
        "duplicate": False,
        "skipped": 0,
    }
    again = post(server, cred, doc)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["accepted"] == 0
    plain = post(server, cred, batch([window(now - 100, version="9.0", latency=[20])]), gz=False)
    assert plain.status_code == 200 and plain.json()["accepted"] == 1

    rows = query(server, group_by="device_id", where="device_id=ing-1")
    assert len(rows) == 1 and rows[0]["windows"] == 3 and rows[0]["requests"] == 4
    text = httpx.get(server.url + "/metrics").text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["slmops_telemetry_duplicate_batches_total"] >= 1
    assert values["slmops_telemetry_dropped_windows_total"] >= 3
    assert values["slmops_telemetry_windows_total"] >= 3


def test_ingest_refuses_bad_auth_encoding_bodies_and_bombs(server: Server) -> None:
    cred = device(server, "bad-1", "rpi5")
    doc = batch([window(time.time(), version="1", latency=[10])])
    assert_envelope(post(server, "slmd_" + "x" * 43, doc), 401, "unauthorized")
    assert_envelope(post(server, make_token(server, "operator"), doc), 401, "unauthorized")
    url, auth = server.url + "/device/v1/telemetry", {"Authorization": f"Bearer {cred}"}
    r = httpx.post(url, content=b"not gzip", headers={**auth, "Content-Encoding": "gzip"})
    assert_envelope(r, 400, "bad_encoding")
    truncated = gzip.compress(json.dumps(doc).encode())[:-10]
    r = httpx.post(url, content=truncated, headers={**auth, "Content-Encoding": "gzip"})
    assert_envelope(r, 400, "bad_encoding")
    assert_envelope(post(server, cred, {"batch_id": "short"}), 422, "invalid_request")
    r = httpx.post(
        url, content=gzip.compress(b"{not json"), headers={**auth, "Content-Encoding": "gzip"}
    )
    assert_envelope(r, 422, "invalid_request")
    bad_hist = batch([{**window(0, version="1", latency=[1]), "histograms": {"x": {"counts": []}}}])
    assert_envelope(post(server, cred, bad_hist), 422, "invalid_request")
    bomb = gzip.compress(b" " * (64 << 20), compresslevel=9)  # 64 MiB of spaces, ~64 KiB sent
    assert len(bomb) < 1 << 20
    r = httpx.post(url, content=bomb, headers={**auth, "Content-Encoding": "gzip"}, timeout=30)
    assert_envelope(r, 413, "payload_too_large")
    big = os.urandom((1 << 20) + 10)
    assert_envelope(httpx.post(url, content=big, headers=auth, timeout=30), 413)
    assert httpx.get(server.url + "/healthz").status_code == 200


# --- queries ---------------------------------------------------------------------------------


def test_queries_merge_and_group_by_version_profile_and_label(server: Server) -> None:
    base = (int(time.time()) // HOUR - 10) * HOUR  # whole hours in the past
    fleet = {
        "qry-a": ("rpi5", "x"),
        "qry-b": ("rpi5", "y"),
        "qry-c": ("jetson", "x"),
    }
    raw: dict[str, dict[str, Any]] = {}  # key -> raw values kept by the query range
    creds = {d: device(server, d, p, runs=("1.1", "1.0"), site=s) for d, (p, s) in fleet.items()}
    since, until = base + 500, base + 2 * HOUR  # partial first hour, whole second hour
    for n, (dev, cred) in enumerate(creds.items()):
        windows = []
        for k, offset in enumerate([100, 1000, HOUR + 100, HOUR + 2000, 2 * HOUR]):
            version = "1.0" if (n + k) % 2 else "1.1"
            lat = [20.0 + 30 * n + 7 * k + j for j in range(5 + n)]
            tps = [10.0 + n + j for j in range(len(lat))]
            outs = [5.0 + j for j in range(len(lat))]
            lps = [-0.5 - 0.1 * (n + k + j) for j in range(3 + k)]
            w = window(
                base + offset,
                version=version,
                latency=lat,
                tps=tps,
                out_tokens=outs,
                logprobs=lps,
                errors=k % 2,
                feedback=(n, k),
                noised=["requests"] if dev == "qry-c" else [],
            )
            windows.append(w)
            if since <= base + offset < until:
                profile, site = fleet[dev]
                for key in (f"v:{version}", f"p:{profile}", f"s:{site}"):
                    r = raw.setdefault(
                        key,
                        {
                            "lat": [],
                            "tps": [],
                            "outs": [],
                            "lps": [],
                            "err": 0,
                            "up": 0,
                            "down": 0,
                            "devices": set(),
                            "windows": 0,
                        },
                    )
                    r["lat"] += lat
                    r["tps"] += tps
                    r["outs"] += outs
                    r["lps"] += lps
                    r["err"] += k % 2
                    r["up"] += n
                    r["down"] += k
                    r["devices"].add(dev)
                    r["windows"] += 1
        assert post(server, cred, batch(windows)).status_code == 200

    where = "model=m"
    for group, prefix in (("version", "v"), ("profile", "p"), ("label:site", "s")):
        rows = query(server, group_by=group, since=since, until=until, where=where)
        rows = [r for r in rows if f"{prefix}:{r[group]}" in raw]
        assert {f"{prefix}:{r[group]}" for r in rows} == {k for k in raw if k[0] == prefix}
        for row in rows:
            r = raw[f"{prefix}:{row[group]}"]
            assert row["windows"] == r["windows"] and row["devices"] == len(r["devices"])
            assert row["requests"] == len(r["lat"])
            assert row["error_rate"] == pytest.approx(r["err"] / len(r["lat"]))
            assert row["tokens_per_s"] == pytest.approx(statistics.fmean(r["tps"]))
            assert row["output_tokens_mean"] == pytest.approx(statistics.fmean(r["outs"]))
            assert row["logprob_mean"] == pytest.approx(statistics.fmean(r["lps"]))
            assert (row["feedback_up"], row["feedback_down"]) == (r["up"], r["down"])
            for q, name in ((0.5, "latency_p50_ms"), (0.95, "latency_p95_ms")):
                in_bucket("latency_ms", row[name], r["lat"], q)
            in_bucket("ttft_ms", row["ttft_p95_ms"], r["lat"], 0.95)
            assert row["noised"] == (["requests"] if "qry-c" in r["devices"] else [])
    two = query(server, group_by=["version", "profile"], since=since, until=until, where=where)
    assert all(set(r) >= {"version", "profile", "requests"} for r in two)
    assert sum(r["requests"] for r in two) == sum(
        len(raw[k]["lat"]) for k in raw if k.startswith("v:")
    )
    with server.client(make_token(server, "viewer")) as c:
        assert_envelope(c.get("/api/v1/telemetry", params={"group_by": "colour"}), 400)
        assert_envelope(c.get("/api/v1/telemetry", params={"where": "nokey"}), 422)
    assert_envelope(httpx.get(server.url + "/api/v1/telemetry"), 401)


# --- rollout cohorts and a metric gate -------------------------------------------------------


def _rollout(db: Database, rollout_id: str, devices: dict[str, str]) -> RolloutState:
    """A running rollout to 1.1.0 over ``devices`` (all on 1.0.0, class rpi5); wave 0 moves one
    device, which reports active. Its gates wait for a latency figure."""
    policy = RolloutPolicy.model_validate(
        {
            "waves": [{"count": 1}, {"percent": 100}],
            "gates": {
                "min_soak_seconds": 0,
                "metrics": [
                    {
                        "metric": "latency_p95_ms",
                        "better": "lower",
                        "tolerance": 0.2,
                        "min_samples": 50,
                    }
                ],
                "on_failure": "rollback",
            },
        }
    )
    now = time.time()
    state = create_rollout(rollout_id, "1.1.0", now=now, policy=policy)
    matched = [
        MatchedDevice(device_id=d, hardware_class="rpi5", current_version="1.0.0") for d in devices
    ]
    state, _ = step(state, DevicesMatched(devices=matched), now)
    state, _ = step(state, OperatorCommand(action=OperatorAction.START, actor="t"), now)
    (canary,) = state.assigned
    state, _ = step(state, DeviceReport(device_id=canary, state="active"), now)
    with db.sessions() as session:
        session.add(
            Rollout(
                id=rollout_id,
                blueprint="none",
                model="m",
                target_version="1.1.0",
                state_json=state.to_json(),
                status=state.status.value,
            )
        )
        session.commit()
    return state


def test_cohort_figures_and_a_slower_canary_is_rolled_back(server: Server, db: Database) -> None:
    names = ["gate-1", "gate-2", "gate-3"]
    creds = {d: device(server, d, "rpi5") for d in names}
    outside = device(server, "gate-4", "rpi5", runs=("1.0.0",))  # not in the rollout
    other_model = device(server, "gate-5", "rpi5", runs=("1.0.0",), model="other")
    state = _rollout(db, "gate-r1", creds)
    (canary,) = state.assigned
    for dev, cred in creds.items():
        check_in(server, cred, "rpi5", {}, ("1.1.0",) if dev == canary else ("1.0.0",))
    start = time.time() + 1
    canary_lat = [300.0 + j for j in range(60)]
    base_lat: list[float] = []
    for dev, cred in creds.items():
        if dev == canary:
            w = window(
                start,
                version="1.1.0",
                latency=canary_lat,
                rollout_id="gate-r1",
                logprobs=[-1.0] * 10,
            )
        else:
            lat = [60.0 + j % 30 for j in range(40)]
            base_lat += lat
            w = window(start, version="1.0.0", latency=lat, logprobs=[-0.5] * 10)
        assert post(server, cred, batch([w])).status_code == 200
    lat4 = [70.0] * 20
    base_lat += lat4
    assert post(server, outside, batch([window(start, version="1.0.0", latency=lat4)])).is_success
    noise = window(start, version="1.0.0", latency=[9000.0] * 50, model="other")
    assert post(server, other_model, batch([noise])).is_success

    with db.sessions() as session:
        figs = {(f.cohort.value, f.metric): f for f in figures_for(session, state, start - 10)}
        rows = summarize(session, group_by=["cohort:gate-r1"], since=start - 10)
    assert {f.hardware_class for f in figs.values()} == {"rpi5"}
    assert figs["canary", "latency_p95_ms"].samples == 60
    assert figs["baseline", "latency_p95_ms"].samples == len(base_lat) == 100
    in_bucket("latency_ms", figs["canary", "latency_p95_ms"].value, canary_lat, 0.95)
    in_bucket("latency_ms", figs["baseline", "latency_p95_ms"].value, base_lat, 0.95)
    assert figs["canary", "error_rate"].value == 0
    assert figs["canary", "logprob_mean"].value == -1.0
    assert figs["canary", "logprob_mean"].samples == 10
    assert {r["cohort:gate-r1"]: r["requests"] for r in rows} == {"canary": 60, "baseline": 100}

    with db.sessions() as session:
        fed = feed_metrics(session, Context(BlobStore(server.data), poll_seconds=60))
    assert fed >= 1
    with server.client(make_token(server, "viewer")) as c:
        doc = c.get("/api/v1/rollouts/gate-r1").json()
    assert doc["status"] in ("rolling-back", "rolled-back"), doc["status"]
    results = json.dumps(doc)
    assert "metric:latency_p95_ms[rpi5]" in results


def test_a_matching_canary_is_not_stopped(server: Server, db: Database) -> None:
    creds = {d: device(server, d, "rpi5") for d in ["same-1", "same-2"]}
    state = _rollout(db, "same-r1", creds)
    for dev, cred in creds.items():
        check_in(server, cred, "rpi5", {}, ("1.1.0",) if dev in state.assigned else ("1.0.0",))
    start = time.time() + 1
    for dev, cred in creds.items():
        version = "1.1.0" if dev in state.assigned else "1.0.0"
        w = window(start, version=version, latency=[80.0] * 60)
        assert post(server, cred, batch([w])).is_success
    with db.sessions() as session:
        feed_metrics(session, Context(BlobStore(server.data), poll_seconds=60))
        row = session.get(Rollout, "same-r1")
        assert row is not None
        after = RolloutState.from_json(row.state_json)
    assert after.status.value in ("running", "succeeded")
    assert any(f.metric == "latency_p95_ms" for f in after.figures)


# --- drift -----------------------------------------------------------------------------------


def test_drift_alert_for_a_shifted_distribution_only(server: Server, db: Database) -> None:
    rng = [(-0.3, 400), (-0.8, 300), (-1.7, 200), (-5.0, 100)]
    field_same = [v for v, n in rng for _ in range(n // 4)]
    field_shift = [-7.0] * 150 + [-0.3] * 50
    base_counts = hist("logprob", [v for v, n in rng for _ in range(n)])["counts"]
    for dev, values in (("drift-a", field_same), ("drift-b", field_shift)):
        cred = device(server, dev, "rpi5" if dev == "drift-a" else "jetson", runs=("3.0",))
        w = window(
            time.time() - 60, version="3.0", latency=[10.0], logprobs=values, out_tokens=[8.0] * 200
        )
        assert post(server, cred, batch([w])).is_success

    def baselines(model: str, version: str, variant: str) -> dict[str, list[float]] | None:
        if (model, version) != ("m", "3.0"):
            return None
        return {"logprob": base_counts, "output_tokens": hist("output_tokens", [8.0])["counts"]}

    store = BlobStore(server.data)
    with db.sessions() as session:
        raised = check_drift(session, store, baselines=baselines, min_samples=100)
        found = [(a.profile, a.statistic, a.value) for a in raised]
        again = check_drift(session, store, baselines=baselines, min_samples=100)
        no_bundle = check_drift(session, store)  # no bundle with a baseline: nothing to compare
    assert [(p, s) for p, s, _ in found] == [("jetson", "psi:logprob")], found
    assert found[0][2] > 0.2
    assert again == [] and no_bundle == []
    with server.client(make_token(server, "viewer")) as c:
        alerts = c.get("/api/v1/alerts", params={"acknowledged": False}).json()["data"]
    mine = [a for a in alerts if a["version"] == "3.0"]
    assert len(mine) == 1 and mine[0]["kind"] == "drift" and mine[0]["threshold"] == 0.2
    with server.client(make_token(server, "operator")) as c:
        r = c.post(f"/api/v1/alerts/{mine[0]['id']}/ack")
    assert r.status_code == 200 and r.json()["acknowledged"] is True


# --- /metrics --------------------------------------------------------------------------------


def test_metrics_pass_promtool(server: Server) -> None:
    cred = device(server, "prom-1", "rpi5", runs=("5.0",))
    w = window(time.time() - 30, version="5.0", latency=[12.0, 80.0], errors=1)
    assert post(server, cred, batch([w])).is_success
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=r.text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for family in (
        'slmops_devices{profile="rpi5"}',
        'slmops_telemetry_requests_total{adapter="",version="5.0"}',
        'slmops_telemetry_errors_total{adapter="",version="5.0"}',
        'slmops_telemetry_latency_seconds{adapter="",profile="rpi5",quantile="0.95",version="5.0"}',
        "slmops_devices_seen_recently",
        "slmops_telemetry_batches_total",
    ):
        assert family in r.text, family


# --- PostgreSQL ------------------------------------------------------------------------------


def test_ingest_on_postgresql_with_racing_retries(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from pg import postgres_cluster

    with postgres_cluster() as url:
        os.environ["SLMOPS_DB_URL"] = url
        try:
            for srv in _server(tmp_path_factory):
                _racing_retries(srv)
        finally:
            del os.environ["SLMOPS_DB_URL"]


def _racing_retries(srv: Server) -> None:
    """Four deliveries of one batch at once: one stored, three duplicates."""
    cred = device(srv, "pg-1", "rpi5", runs=("1",))
    now = time.time()
    doc = batch(
        [
            window(now - 60, version="1", latency=[10.0, 20.0]),
            window(now - 30, version="1", latency=[30.0]),
        ]
    )
    answers: list[httpx.Response] = []

    def send() -> None:
        answers.append(post(srv, cred, doc))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert sorted(a.json()["duplicate"] for a in answers) == [False, True, True, True]
    rows = query(srv, group_by="profile")
    assert rows == [rows[0]] and rows[0]["requests"] == 3 and rows[0]["windows"] == 2
    bomb = gzip.compress(b"0" * (16 << 20))
    r = httpx.post(
        srv.url + "/device/v1/telemetry",
        content=bomb,
        headers={"Authorization": f"Bearer {cred}", "Content-Encoding": "gzip"},
    )
    assert_envelope(r, 413)


def test_baseline_is_read_from_a_variant_descriptor() -> None:
    from slmops.protocol.bundle import VariantDescriptor
    from slmops.server.telemetry.drift import baseline_of

    logprob = hist("logprob", [-0.3, -2.0])["counts"]
    outs = hist("output_tokens", [8.0])["counts"]
    doc = {"name": "q4", "runtime": "llama.cpp", "format": "gguf", "disk_bytes": 1}
    assert baseline_of(VariantDescriptor.model_validate(doc)) is None
    with_base = {
        **doc,
        "baseline": {"logprob": logprob, "output_tokens": outs, "prompts": 2, "max_tokens": 8},
    }
    found = baseline_of(VariantDescriptor.model_validate(with_base))
    assert found == {"logprob": logprob, "output_tokens": outs}
    assert baseline_of(with_base) == found  # a plain dict (e.g. an older reader) works too


def test_retention_keeps_whole_hours_in_the_roll_up(tmp_path: Any) -> None:
    from slmops.protocol.telemetry import TelemetryBatch
    from slmops.server.db.models import Device
    from slmops.server.telemetry.store import prune, store_batch
    from slmops.server.telemetry.tables import TelemetryWindowRow

    database = open_database(load_settings(data_dir=tmp_path))
    old = (int(time.time()) // HOUR - 48) * HOUR
    with database.sessions() as session:
        dev = Device(device_id="ret-1", credential_hash="x" * 64, profile="rpi5")
        dev.active = {"name": "m", "version": "1", "variant": "q4", "digest": "sha256:" + "0" * 64}
        session.add(dev)
        session.commit()
        doc = batch([window(old + 60 * k, version="1", latency=[10.0] * (k + 1)) for k in range(4)])
        parsed = TelemetryBatch.model_validate(doc)
        assert store_batch(session, dev, parsed, now=old + HOUR).windows == 4
        assert store_batch(session, dev, parsed, now=old + HOUR).duplicate
        assert prune(session, now=time.time(), keep_windows_s=86400) == 4
        assert session.query(TelemetryWindowRow).count() == 0
        rows = summarize(session, group_by=["version"], since=old, until=old + HOUR)
        assert [(r["version"], r["requests"], r["windows"]) for r in rows] == [("1", 10, 4)]
        edge = summarize(session, group_by=["version"], since=old + 1, until=old + HOUR)
        assert edge == []  # a partial hour needs the windows, which retention removed
    database.dispose()


def test_drift_against_the_baseline_of_a_pushed_bundle(
    server: Server, db: Database, tmp_path: Any
) -> None:
    """End to end: the baseline comes from the variant descriptor of a bundle pushed to the
    registry (no injected baselines); a field distribution like it raises nothing, a shifted
    one raises one PSI alert."""
    from factories.blueprints import MODEL
    from factories.bundles import make_inputs
    from slmops.bundle.build import build_bundle
    from slmops.bundle.inspect import inspect_bundle
    from slmops.bundle.registry import push

    variants, report = make_inputs(tmp_path / "in", None)
    built = build_bundle(variants, report, name=MODEL, version="7.0.0", out=tmp_path / "b")
    push(
        built.path, f"oci://{server.url.removeprefix('http://')}/{MODEL}:7.0.0", token=server.admin
    )
    with_baseline = [
        v for v in inspect_bundle(built.path)["variants"] if v["descriptor"].get("baseline")
    ]
    variant = with_baseline[0]["name"]
    counts = with_baseline[0]["descriptor"]["baseline"]["logprob"]
    bounds = BOUNDS["logprob"]
    inside = [bounds[0] - 1, *bounds[1:], bounds[-1] / 2]  # a value in each bucket
    like = [inside[i] for i, n in enumerate(counts) for _ in range(int(n))]
    shifted = [-7.0] * len(like)
    for dev, values, profile in (("base-a", like, "rpi5"), ("base-b", shifted, "jetson")):
        cred = device(server, dev, profile, runs=("7.0.0",), model=MODEL, variant=variant)
        w = window(
            time.time() - 60,
            version="7.0.0",
            latency=[10.0],
            logprobs=values,
            model=MODEL,
            variant=variant,
        )
        assert post(server, cred, batch([w])).is_success

    with db.sessions() as session:
        raised = check_drift(session, BlobStore(server.data), min_samples=100)
    mine = [(a.profile, a.statistic) for a in raised if a.version == "7.0.0"]
    assert mine == [("jetson", "psi:logprob")], mine
