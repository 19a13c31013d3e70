"""Telemetry through the whole path: a real agent process serves requests, aggregates them in
windows, and delivers gzip batches to a real control plane, where the operator API answers.

The blueprint sets 10-second windows; the test drives requests (one refused while no model is
active, several served, one rated thumbs-down through /v1/feedback), stops the server for a
while (batches wait in the agent's outbox on disk) and checks that every request arrives exactly
once with its quality proxy, and that no text left the device.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from control_plane import ControlPlane, cli_json, start_agent, stop_agent, wait_for
from helpers import free_port

NAME = "acme/bot"


def blueprint(version: str) -> dict[str, Any]:
    return {
        "selector": {"room": "lab"},
        "model": {"name": NAME, "version": version},
        "generation": {"max_tokens": 8, "temperature": 0},
        "rollout": {"waves": [{"percent": 100}], "gates": {"min_soak_seconds": 0}},
        "telemetry": {"window_seconds": 10},
    }


def summary(cp: ControlPlane, *group_by: str) -> list[dict[str, Any]]:
    params = [("group_by", g) for g in group_by]
    r = httpx.get(
        f"{cp.url}/api/v1/telemetry",
        params=params,
        headers={"Authorization": f"Bearer {cp.admin}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def test_requests_become_windows_that_reach_the_server_once(tmp_path: Path, bundles: Any) -> None:
    cp = ControlPlane(
        tmp_path / "server",
        {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2", "SLMOPS_POLL_SECONDS": "1"},
    )
    cp.start()
    data, port = tmp_path / "agent", free_port()
    api = f"http://127.0.0.1:{port}/v1"
    cp.push(bundles.v1, NAME, "1.0.0")
    token = cli_json("enrollment-token", "create", "--data", cp.data)["token"]
    agent = start_agent(
        data, cp.url, port, "--enroll-token", token, "--trusted-key", str(bundles.pub)
    )
    try:
        wait_for("enrollment", lambda: cp.devices())
        refused = httpx.post(
            api + "/chat/completions",
            json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert refused.status_code == 503
        cp.apply("lab", blueprint("1.0.0"))
        wait_for("the model", lambda: httpx.get(api + "/models", timeout=5).json()["data"], 60)
        ids = []
        secret = "mail me at jane.doe@example.com"
        for i in range(5):
            r = httpx.post(
                api + "/chat/completions",
                json={"model": NAME, "messages": [{"role": "user", "content": f"{secret} {i}"}]},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        r = httpx.post(api + "/feedback", json={"response_id": ids[0], "rating": "down"}, timeout=5)
        assert r.status_code == 200 and r.json()["recorded"] is True
        bogus = httpx.post(
            api + "/feedback", json={"response_id": "nope", "rating": "up"}, timeout=5
        )
        assert bogus.status_code == 404

        cp.stop()  # batches now wait in the outbox on disk
        time.sleep(11)  # the window closes while the server is away
        assert list((data / "telemetry").iterdir()), "nothing buffered while offline"
        cp.start()

        def arrived() -> list[dict[str, Any]]:
            rows = [r for r in summary(cp, "version") if r["version"] == "1.0.0"]
            return rows if rows and rows[0]["requests"] >= 5 else []

        [row] = wait_for("telemetry for 1.0.0", arrived, 60)
        assert row["requests"] == 5 and row["errors"] == 0  # the 503 counted under no model
        assert row["feedback_down"] == 1 and row["feedback_up"] == 0
        assert row["output_tokens"] > 0 and row["tokens_per_s"] > 0
        assert row["logprob_mean"] is not None and row["logprob_mean"] <= 0
        assert row["latency_p95_ms"] is not None and row["latency_p95_ms"] > 0
        errors = [r for r in summary(cp, "version") if r["version"] in ("", None)]
        assert errors and errors[0]["errors"] == 1  # the refused request, before any model
        time.sleep(2)  # a few more polls: a delivered batch is never counted again
        [again] = [r for r in summary(cp, "version") if r["version"] == "1.0.0"]
        assert again["requests"] == 5
        db_text = b"".join(p.read_bytes() for p in cp.data.glob("slmops.db*"))
        assert b"jane.doe" not in db_text  # prompts never left the device
    finally:
        stop_agent(agent)
        cp.stop()
