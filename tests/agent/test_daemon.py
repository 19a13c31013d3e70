"""The agent daemon end to end: a real control plane subprocess, a real agent subprocess.

The agent enrolls with a token made by the server CLI, keeps checking in (304s), answers 503 on
its OpenAI API while no model is active, reuses its credential after a restart, backs off while
the server is down without exiting (its API still answers) and resumes when it returns. Plus
the import boundary and the backoff/jitter schedule as unit tests.
"""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from control_plane import (
    AGENT_CLI,
    ControlPlane,
    cli_json,
    immediate_rollout,
    start_agent,
    status,
    stop_agent,
    wait_for,
)
from helpers import free_port
from slmops.agent.backoff import Backoff, jittered
from slmops.agent.config import hostname_device_id, load_config
from slmops.agent.inventory import collect
from slmops.core.errors import ConfigError

NAME = "acme/bot"


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    # agents poll every 0.2 s (--poll-seconds); the server's interval decides how often an idle
    # check-in writes last_seen (half of it), so keep it short here too
    env = {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2", "SLMOPS_POLL_SECONDS": "1"}
    cp = ControlPlane(tmp_path / "server", env)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


def blueprint(version: str, **generation: Any) -> dict[str, Any]:
    """Every device labelled room=lab on acme/bot `version`, moved in one wave without soak."""
    return {
        "selector": {"room": "lab"},
        "model": {"name": NAME, "version": version},
        "generation": generation,
        "rollout": immediate_rollout(),
    }


def failed_actions(cp: ControlPlane, device_id: str) -> list[dict[str, Any]]:
    return [a for a in cp.device(device_id)["actions"] if a["state"] == "failed"]


def weights_digest(bundle: Path) -> str:
    """The digest of the largest blob of a bundle (its weights)."""
    blobs = (bundle / "blobs" / "sha256").iterdir()
    return "sha256:" + max(blobs, key=lambda p: p.stat().st_size).name


def test_agent_enrolls_polls_serves_503_survives_outage(
    control_plane: ControlPlane, tmp_path: Path, bundles: Any
) -> None:
    cp = control_plane
    token = cli_json("enrollment-token", "create", "--data", cp.data, "--labels", "site=hq")
    data, port = tmp_path / "agent", free_port()
    api = f"http://127.0.0.1:{port}/v1"
    trust = ("--trusted-key", str(bundles.pub))
    agent = start_agent(data, cp.url, port, "--enroll-token", token["token"], *trust)
    try:
        devices = wait_for("enrollment", lambda: cp.devices() and (data / "credential").exists())
        devices = cp.devices()
        assert [d["device_id"] for d in devices] == ["edge-1"]
        dev = devices[0]
        assert dev["labels"] == {"room": "lab", "site": "hq"}
        assert dev["inventory"]["cores"] >= 1 and dev["inventory"]["ram_bytes"] > 0
        assert dev["inventory"]["model_ram_bytes"] == dev["inventory"]["ram_bytes"] // 2
        mode = stat.S_IMODE((data / "credential").stat().st_mode)
        assert mode == 0o600, oct(mode)

        # keeps checking in; unchanged desired state comes back as 304
        wait_for("304 check-ins", lambda: status(data).get("not_modified", 0) >= 3)
        seen = dev["last_seen"]
        wait_for("last_seen to advance", lambda: cp.devices()[0]["last_seen"] != seen)

        # the OpenAI API answers clearly while no model is active
        r = httpx.post(
            api + "/chat/completions",
            json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
            timeout=5,
        )
        assert r.status_code == 503
        assert "no model is active" in r.json()["error"]["message"]
        assert httpx.get(api + "/models", timeout=5).json()["data"] == []

        # a desired model the server cannot serve (its weights blob is gone from the registry
        # store): reported as failed, and the agent carries on
        cp.push(bundles.v1, NAME, "1.0.0")
        cp.blob(weights_digest(bundles.v1)).unlink()
        rollout = cp.apply("lab", blueprint("1.0.0"))
        assert rollout is not None
        failed = wait_for("the failed action", lambda: failed_actions(cp, "edge-1"))
        assert failed[0]["stage"] == "downloading" and failed[0]["version"] == "1.0.0"
        assert failed[0]["rollout_id"] == rollout, failed
        assert httpx.get(api + "/models", timeout=5).status_code == 200
        assert agent.poll() is None

        time.sleep(2)  # idle a little, then measure what an idle agent costs
        rss_mb = psutil.Process(agent.pid).memory_info().rss / 2**20
        print(f"idle agent RSS: {rss_mb:.1f} MB")
        assert rss_mb < 200

        # a restart reuses the credential: no token needed, no second device
        assert stop_agent(agent) == 0
        assert status(data)["state"] == "stopped"
        before = status(data)["time"]
        agent = start_agent(data, cp.url, port, *trust)
        wait_for("check-ins after restart", lambda: status(data).get("time", 0) > before)
        wait_for("a 304 after restart", lambda: status(data).get("not_modified", 0) >= 1)
        assert [d["device_id"] for d in cp.devices()] == ["edge-1"]

        # the server goes away: the agent backs off, stays up, keeps serving
        cp.stop()
        wait_for("backoff", lambda: status(data).get("state") == "backoff")
        wait_for("several failures", lambda: status(data).get("failures", 0) >= 3)
        assert agent.poll() is None
        r = httpx.post(api + "/completions", json={"model": "x", "prompt": "hi"}, timeout=5)
        assert r.status_code == 503

        # it comes back: check-ins resume
        cp.start()
        wait_for("check-ins to resume", lambda: status(data).get("state") == "ok")
        n = status(data)["checkins"]
        wait_for("more check-ins", lambda: status(data).get("checkins", 0) > n)
        assert agent.poll() is None
        log = (data / "agent.log").read_text()
        warnings = log.count("check-in failed, backing off")
        assert 1 <= warnings < status(data)["failures"], log  # once per streak, not per failure
        assert "server reachable again" in log
    finally:
        if agent.poll() is None:
            stop_agent(agent)


def test_agent_serves_the_active_model_with_the_blueprint_defaults(
    control_plane: ControlPlane, tmp_path: Path, bundles: Any, desired: Any
) -> None:
    """A model already installed (as after a reboot) is served; generation defaults from the
    desired state apply to requests that do not set them."""
    from slmops.agent.fetch import LayoutSource
    from slmops.agent.install import Installer

    cp = control_plane
    data, port = tmp_path / "agent", free_port()
    final = Installer(data, [bundles.pub], threads=1).apply(
        desired(bundles.v1, "1.0.0"), LayoutSource(bundles.v1), lambda s: None
    )
    assert final.state.value == "active", final.detail
    cp.push(bundles.v1, NAME, "1.0.0")
    token = cli_json("enrollment-token", "create", "--data", cp.data)["token"]
    trust = ("--trusted-key", str(bundles.pub))
    agent = start_agent(data, cp.url, port, "--enroll-token", token, "--threads", "1", *trust)
    api = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for("the installed model reported", lambda: cp.devices() and cp.devices()[0]["active"])
        # the blueprint names the version the device already runs: the rollout skips it (nothing
        # to install) and its desired state carries the generation defaults
        rollout = cp.apply("lab", blueprint("1.0.0", max_tokens=3, temperature=0))
        assert rollout is not None
        skipped = cp.rollout(rollout)["device_list"]
        assert [(d["device_id"], d["status"]) for d in skipped] == [("edge-1", "skipped")]
        wait_for(
            "the new defaults",
            lambda: (
                '"max_tokens": 3' in (data / "desired.json").read_text()
                if (data / "desired.json").exists()
                else False
            ),
        )
        models = httpx.get(api + "/models", timeout=5).json()["data"]
        assert [m["id"] for m in models] == ["acme/bot:1.0.0"]
        r = httpx.post(
            api + "/chat/completions",
            json={"model": "acme/bot", "messages": [{"role": "user", "content": "Hello"}]},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 3
        rss_mb = psutil.Process(agent.pid).memory_info().rss / 2**20
        print(f"agent RSS with the tiny model loaded: {rss_mb:.1f} MB")
        dev = wait_for("active reported", lambda: cp.devices()[0]["active"])
        assert dev["version"] == "1.0.0"
        assert "downloading" not in (data / "agent.log").read_text()  # nothing was fetched
    finally:
        stop_agent(agent)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server", "ftp://x", "--enroll-token", "slme_x"], "not an http(s) URL"),
        (["--server", "http://192.0.2.1:1"], "plain http"),
        (["--server", "http://127.0.0.1:9"], "not enrolled and no enrollment token"),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    res = subprocess.run(
        [*AGENT_CLI, "--data", str(tmp_path / "a"), "--api-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stdout + res.stderr


def test_refused_enrollment_token_exits_2(control_plane: ControlPlane, tmp_path: Path) -> None:
    agent = start_agent(
        tmp_path / "a", control_plane.url, free_port(), "--enroll-token", "slme_" + "x" * 40
    )
    assert agent.wait(timeout=30) == 2
    assert "enrollment token" in (tmp_path / "a" / "agent.log").read_text()
    assert control_plane.devices() == []


def test_agent_modules_import_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "import slmops.agent.daemon, slmops.agent.client, slmops.agent.inventory\n"
        "import slmops.agent.config, slmops.cli.agent\n"
        "from slmops.agent.inventory import available_runtimes\n"
        "available_runtimes()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'llama_cpp', 'onnxruntime_genai', 'onnxruntime')"
        " or m.startswith('slmops.server'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_config_file_options_override_and_device_id_persisted(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.yaml"
    cfg_file.write_text(
        f"server: https://cp.example:8443\ndata_dir: {tmp_path / 'd'}\n"
        "labels: {room: a}\napi_port: 9000\n"
    )
    cfg = load_config(cfg_file, api_port=9100, labels=None)
    assert (cfg.api_port, cfg.labels, cfg.api_host) == (9100, {"room": "a"}, "127.0.0.1")
    first = cfg.resolved_device_id()
    assert first == hostname_device_id() and (cfg.data_dir / "device_id").is_file()
    assert load_config(cfg_file).resolved_device_id() == first
    cfg_file.write_text("server: https://cp\ndata_dir: /x\nsurprise: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'surprise'"):
        load_config(cfg_file)
    with pytest.raises(ConfigError, match="missing server"):
        load_config(None, data_dir=tmp_path)


def test_inventory_reports_this_box(tmp_path: Path) -> None:
    cfg = load_config(None, server="http://127.0.0.1:1", data_dir=tmp_path, model_ram_mb=512)
    inv = collect(cfg)
    assert inv.model_ram_bytes == 512 * 2**20 and inv.model_cores == inv.cores
    assert inv.free_disk_bytes > 0 and inv.ram_bytes == psutil.virtual_memory().total


def test_backoff_schedule_is_exponential_full_jitter_and_capped() -> None:
    b = Backoff(base=1.0, cap=10.0, rng=random.Random(7))
    ceilings, delays = [], []
    for _ in range(7):
        delays.append(b.next_delay())
        ceilings.append(b.ceiling())
    assert ceilings == [1, 2, 4, 8, 10, 10, 10]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    again = Backoff(base=1.0, cap=10.0, rng=random.Random(7))
    assert [again.next_delay() for _ in range(7)] == delays  # deterministic with a seeded RNG
    b.reset()
    assert b.failures == 0 and b.ceiling() == 1


def test_poll_jitter_stays_within_ten_percent() -> None:
    rng = random.Random(1)
    values = [jittered(60.0, rng) for _ in range(2000)]
    assert all(54.0 <= v <= 66.0 for v in values)
    assert max(values) - min(values) > 10.0  # it really spreads
