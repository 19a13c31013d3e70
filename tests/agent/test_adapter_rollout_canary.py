"""Adapter changes roll out like versions: waves, gates, automatic rollback (issue 13).

A real control plane and two real agents on the same base model. The first release loads
store-s1:1.0.0 on both (a rollout: devices outside it never get an adapter by themselves).
The second release names store-s1:2.0.0, pushed and signed, but with a key the devices do not
trust, as a release signed with the wrong key would be: the one-device canary wave refuses it
(the agent keeps 1.0.0 loaded and reports the failure for the rollout), the wave's success gate
fails, the rollout rolls back, and the device outside the canary is never told 2.0.0.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapter_fixtures import make_adapter
from control_plane import ControlPlane, cli_json, start_agent, status, stop_agent
from control_plane import wait_for as _wait_for
from helpers import free_port
from slmops.bundle.adapter import build_adapter_bundle
from slmops.bundle.registry import push
from slmops.bundle.signing import init_keys, sign_bundle
from slmops.protocol.device import DesiredModel

NAME = "acme/bot"
Desired = Callable[[Path, str], DesiredModel]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    return _wait_for(what, check, timeout)


@pytest.fixture(scope="module")
def releases(
    tiny_model: Path, bundles: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """store-s1 1.0.0 signed by the fleet's key, 2.0.0 (same weights) by a key nobody trusts."""
    root = tmp_path_factory.mktemp("adapter-releases")
    folder = make_adapter(tiny_model, root / "adapter-s1", "s1")
    rogue, _ = init_keys(root / "keys", "rogue")
    out = {}
    for version, key in (("1.0.0", bundles.priv), ("2.0.0", rogue)):
        built = build_adapter_bundle(
            folder, bundles.v1, name="store-s1", version=version, out=root / f"art-{version}"
        )
        sign_bundle(built.path, key)
        out[version] = built.path
    return out


def spec(version: str, waves: list[dict[str, Any]]) -> dict[str, Any]:
    gates = {"min_soak_seconds": 0, "timeout_seconds": 120, "min_reported": 1.0}
    return {
        "selector": {"room": "lab"},
        "model": {"name": NAME, "version": "1.0.0"},
        "rollout": {"waves": waves, "gates": gates},
        "adapters": [{"selector": {"site": "s1"}, "adapter": "store-s1", "version": version}],
    }


def loaded(data: Path) -> str | None:
    adapter = status(data).get("adapter") or {}
    return adapter.get("version")


def told(data: Path) -> str | None:
    """The adapter version the agent's stored desired state names (None: none, or no state)."""
    try:
        doc = json.loads((data / "desired.json").read_text())
    except (OSError, ValueError):
        return None
    return ((doc.get("model") or {}).get("adapter") or {}).get("version")


def test_adapter_rollout_with_failing_canary_is_rolled_back(
    adapter_plane: ControlPlane,
    model_data: Path,
    bundles: Any,
    releases: dict[str, Path],
    tmp_path: Path,
) -> None:
    cp = adapter_plane
    cp.push(bundles.v1, NAME, "1.0.0")
    for version, art in releases.items():
        push(art, f"oci://127.0.0.1:{cp.port}/store-s1:{version}", token=cp.admin)
    token = cli_json("enrollment-token", "create", "--data", cp.data)["token"]
    trust = ("--trusted-key", str(bundles.pub), "--threads", "1")
    agents, datas, ports = [], [], []
    try:
        for i in range(2):
            data, port = tmp_path / f"agent-{i}", free_port()
            shutil.copytree(model_data, data)  # both already run acme/bot:1.0.0, no adapter
            agents.append(
                start_agent(
                    data,
                    cp.url,
                    port,
                    "--enroll-token",
                    token,
                    "--device-id",
                    f"edge-{i}",
                    *trust,
                    labels="room=lab,site=s1",
                )
            )
            datas.append(data)
            ports.append(port)
        wait_for(
            "both devices report their model",
            lambda: len(cp.devices()) == 2 and all(d["active"] for d in cp.devices()),
        )

        # release 1: the adapter reaches both devices through a rollout
        first = cp.apply("shops", spec("1.0.0", [{"percent": 100}]))
        assert first is not None, "an adapter change must create a rollout"
        done = cp.wait_rollout(first, timeout=120)
        assert done["status"] == "succeeded", done
        wait_for("1.0.0 loaded on both", lambda: all(loaded(d) == "1.0.0" for d in datas))

        # release 2: signed with a key the devices do not trust; one-device canary first
        seen: dict[str, set[str | None]] = {f"edge-{i}": set() for i in range(2)}

        def watch() -> None:
            for i, d in enumerate(datas):
                seen[f"edge-{i}"].add(told(d))

        second = cp.apply("shops", spec("2.0.0", [{"count": 1}, {"percent": 100}]))
        assert second is not None

        def ended() -> dict[str, Any] | None:
            watch()
            got = cp.rollout(second)
            return got if got["status"] in ("rolled-back", "aborted", "succeeded") else None

        final = wait_for("the second rollout ends", ended, timeout=180)
        assert final["status"] == "rolled-back", final
        for _ in range(3):  # a few more polls: nobody is told 2.0.0 after the rollback
            watch()
            wait_for("a poll", lambda: True)
        canary = [d for d, s in seen.items() if "2.0.0" in s]
        assert len(canary) == 1, seen  # only the canary was ever told the bad release
        other = next(d for d in seen if d not in canary)
        assert "2.0.0" not in seen[other]

        rollout = cp.api("GET", f"/api/v1/rollouts/{second}?limit=10")
        devices = {d["device_id"]: d for d in rollout["device_list"]}
        assert rollout["adapters"][0]["version"] == "2.0.0", rollout
        assert devices[canary[0]]["status"] == "rolled-back", devices
        assert "key" in (devices[canary[0]]["detail"] or "").lower(), devices  # why it failed
        assert devices[other]["status"] == "queued", devices  # never moved

        # every device still serves the stable adapter; the canary's server record agrees
        for i, d in enumerate(datas):
            wait_for(f"edge-{i} back on 1.0.0", lambda d=d: told(d) == "1.0.0")
            assert loaded(d) == "1.0.0"
            r = httpx.post(
                f"http://127.0.0.1:{ports[i]}/v1/completions",
                json={"model": NAME, "prompt": "Store s1:", "max_tokens": 4},
                timeout=30,
            )
            assert r.status_code == 200, r.text
        dev = cp.device(canary[0])
        assert dev["active"]["adapter"]["version"] == "1.0.0", dev["active"]
    finally:
        for agent in agents:
            stop_agent(agent)
