"""Rollouts through the whole path: a real control plane, real agent processes, real bundles.

- a staged rollout (a canary of one device, then the rest) to three agents with different RAM
  budgets and profiles: each installs the variant the server resolved for it; a second version
  follows; a version whose weights cannot load is stopped at the canary and rolled back while
  the other agents never leave the version they run; the official `openai` client talks to one
  agent process;
- kill -9 of an agent at each phase of an update (SLMOPS_AGENT_CRASH_AT), then a restart: the
  agent serves a complete model and the rollout completes;
- a blob tampered with in the server's registry store: the canary fails at verifying, keeps
  serving the old model, and the rollout rolls back.

- a download interrupted half-way resumes with a Range request to the control plane's registry.

- a version that re-ships a variant unchanged is installed by relabelling (no download) and is
  reported, served and checked in under the new version.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane import ControlPlane, immediate_rollout, start_agent, status, stop_agent, wait_for
from helpers import free_port
from slmops.agent import CRASH_ENV
from slmops.agent.fetch import LayoutSource
from slmops.agent.install import Installer
from slmops.agent.slots import SlotStore

NAME = "acme/bot"
MIB = 2**20
FAST = {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2", "SLMOPS_POLL_SECONDS": "1"}


def staged(soak: float = 0.5) -> dict[str, Any]:
    """A canary wave of one device, then every device; a failure rolls back."""
    return {
        "waves": [{"count": 1}, {"percent": 100}],
        "gates": {
            "min_soak_seconds": soak,
            "timeout_seconds": 120,
            "min_reported": 1.0,
            "on_failure": "rollback",
        },
    }


def spec(selector: dict[str, str], version: str, rollout: dict[str, Any]) -> dict[str, Any]:
    return {
        "selector": selector,
        "model": {"name": NAME, "version": version},
        "generation": {"temperature": 0.0, "max_tokens": 8},
        "rollout": rollout,
    }


@dataclass
class Agent:
    device_id: str
    data: Path
    port: int
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return (self.data / "agent.log").read_text()


def entries(rollout: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in rollout["device_list"]}


def active(data: Path) -> dict[str, Any]:
    doc: dict[str, Any] = status(data).get("active") or {}
    return doc


def wait_active(agent: Agent, version: str, timeout: float = 10) -> dict[str, Any]:
    """The agent's active model once its status file says it runs ``version``."""

    def on_it() -> dict[str, Any] | None:
        got = active(agent.data)
        return got if got.get("version") == version else None

    try:
        doc: dict[str, Any] = wait_for(f"{agent.device_id} on {version}", on_it, timeout)
    except AssertionError:
        raise AssertionError(
            f"{agent.device_id} runs {active(agent.data)}:\n{agent.log()}"
        ) from None
    return doc


def wait_checked_in(cp: ControlPlane, device_id: str, version: str) -> dict[str, Any]:
    """The active model the server has for the device once it says ``version`` (the server
    learns it from the device's next check-in, after the action report that ended a rollout)."""

    def on_it() -> dict[str, Any] | None:
        doc: dict[str, Any] = cp.device(device_id).get("active") or {}
        return doc if doc.get("version") == version else None

    found: dict[str, Any] = wait_for(f"{device_id} to check in on {version}", on_it, 10)
    return found


def chat(port: int) -> httpx.Response:
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)


# --- a: staged rollouts to three agents -----------------------------------------------------


def _expected_variants(bundle: Path) -> tuple[dict[str, tuple[int, str | None]], dict[str, str]]:
    """Per device: (RAM MiB for the model, --profile) and the variant the server should pick.

    small-1 gives the model just enough for the variant needing least RAM (and less than the
    other needs); big-1 gives plenty (best quality wins); box-1 gives plenty and names the
    evaluation's profile (its pick wins when the evaluation picked one).
    """
    from slmops.bundle.inspect import inspect_bundle
    from slmops.protocol.bundle import VariantDescriptor
    from slmops.server.resolve import ram_needed

    ds = [
        VariantDescriptor.model_validate(v["descriptor"])
        for v in inspect_bundle(bundle)["variants"]
        if v.get("descriptor")
    ]
    assert len(ds) == 2, ds
    lean, heavy = sorted(ds, key=ram_needed)
    small_mb = -(-ram_needed(lean) // MIB)
    assert small_mb * MIB < ram_needed(heavy), "both variants need the same RAM: cannot split"
    plenty = -(-ram_needed(heavy) // MIB) + 256
    best = min(ds, key=lambda d: (d.kld_mean if d.kld_mean is not None else 1e9, d.disk_bytes))
    picked = next((d for d in ds if "test-box" in d.selected_for), best)
    setup = {"small-1": (small_mb, None), "big-1": (plenty, None), "box-1": (plenty, "test-box")}
    want = {"small-1": lean.name, "big-1": best.name, "box-1": picked.name}
    return setup, want


@pytest.fixture
def fleet(tmp_path: Path, fleet_bundles: Any) -> Iterator[tuple[ControlPlane, list[Agent]]]:
    cp = ControlPlane(tmp_path / "server", FAST)
    cp.start()
    agents: list[Agent] = []
    try:
        setup, _ = _expected_variants(fleet_bundles.v1)
        token = cp.enrollment_token({"fleet": "t"})
        for device_id, (ram_mb, profile) in setup.items():
            data, port = tmp_path / device_id, free_port()
            extra = ["--enroll-token", token, "--trusted-key", str(fleet_bundles.pub)]
            extra += ["--threads", "1", "--model-ram-mb", str(ram_mb)]
            extra += ["--profile", profile] if profile else []
            proc = start_agent(data, cp.url, port, *extra, device_id=device_id, labels="site=a")
            agents.append(Agent(device_id, data, port, proc))
        wait_for("three agents to enroll", lambda: len(cp.devices()) == 3, 60)
        yield cp, agents
    finally:
        for a in agents:
            stop_agent(a.proc)
        cp.stop()


def _openai_calls(port: int, model_id: str) -> None:
    """The official client against a real agent process (test_openai_api.py covers the API
    in depth against serve_in_thread)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [model_id]
    messages: Any = [{"role": "user", "content": "Return the"}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6)
    assert full.choices[0].message.role == "assistant" and full.usage is not None
    assert 0 < full.usage.completion_tokens <= 7
    chunks = list(
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == full.choices[0].message.content  # temperature 0 from the blueprint
    text = client.completions.create(model=NAME, prompt="The function", max_tokens=4)
    assert text.object == "text_completion" and text.usage is not None


def test_staged_rollouts_place_variants_and_stop_a_broken_version_at_the_canary(
    fleet: tuple[ControlPlane, list[Agent]], fleet_bundles: Any
) -> None:
    cp, agents = fleet
    _, want = _expected_variants(fleet_bundles.v1)
    assert len(set(want.values())) == 2, want  # the fleet really resolves different variants
    selector = {"fleet": "t"}

    # 1.0.0 to devices that run nothing yet, then 1.0.1: both staged, both succeed
    for version, bundle in (("1.0.0", fleet_bundles.v1), ("1.0.1", fleet_bundles.v2)):
        cp.push(bundle, NAME, version)
        rid = cp.apply("assistant", spec(selector, version, staged()))
        assert rid is not None
        done = cp.wait_rollout(rid, 90)
        assert done["status"] == "succeeded", done
        assert [w["outcome"] for w in done["wave_list"]] == ["passed", "passed"], done
        moved = entries(done)
        assert sorted(d["wave"] for d in moved.values()) == [0, 1, 1], moved
        assert all(d["status"] == "active" for d in moved.values()), moved
        for a in agents:
            assert a.proc.poll() is None, a.log()
            got = wait_active(a, version)
            assert got["variant"] == want[a.device_id], got
            assert f"action {version} health-checking" in a.log()  # really installed
            reported = wait_checked_in(cp, a.device_id, version)
            assert reported["variant"] == want[a.device_id], reported

    box = next(a for a in agents if a.device_id == "box-1")
    _openai_calls(box.port, f"{NAME}:1.0.1")

    # a signed version whose weights cannot load: the canary fails its health check, the gate
    # rolls back, the canary returns to 1.0.1 and the others never leave it
    cp.push(fleet_bundles.broken, NAME, "1.1.0")
    rid = cp.apply("assistant", spec(selector, "1.1.0", staged()))
    assert rid is not None
    bad = cp.wait_rollout(rid, 90)
    assert bad["status"] == "rolled-back", bad
    assert bad["wave_list"][0]["outcome"] == "failed", bad["wave_list"]
    moved = entries(bad)
    canary = [d for d in moved.values() if d["wave"] is not None]
    assert len(canary) == 1, moved
    c = canary[0]
    assert c["status"] == "rolled-back" and c["failed_stage"] == "health-checking", c
    for a in agents:
        got = active(a.data)
        assert (got["version"], got["variant"]) == ("1.0.1", want[a.device_id]), got
        if a.device_id != c["device_id"]:
            assert moved[a.device_id]["wave"] is None, moved[a.device_id]
            assert "action 1.1.0" not in a.log()  # never told to install it
    assert chat(box.port).status_code == 200


# --- b, c: one control plane, one agent per case, v1 preinstalled ---------------------------


@dataclass
class CrashPlane:
    cp: ControlPlane
    template: Path  # an agent data dir with 1.0.0 installed
    bundles: Any


@pytest.fixture(scope="module")
def crash_plane(
    bundles: Any, desired: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CrashPlane]:
    root = tmp_path_factory.mktemp("fleet-crash")
    template = root / "template"
    final = Installer(template, [bundles.pub], threads=1).apply(
        desired(bundles.v1, "1.0.0"), LayoutSource(bundles.v1), lambda s: None
    )
    assert final.state.value == "active", final.detail
    cp = ControlPlane(root / "server", FAST)
    cp.start()
    try:
        cp.push(bundles.v1, NAME, "1.0.0")
        cp.push(bundles.v2, NAME, "1.1.0")
        yield CrashPlane(cp, template, bundles)
    finally:
        cp.stop()


def _agent_on_v1(
    plane: CrashPlane, tmp_path: Path, device_id: str, labels: str, env: dict[str, str] | None
) -> Agent:
    """An agent whose data dir already holds 1.0.0 (as after an earlier rollout), enrolled and
    reporting it."""
    cp = plane.cp
    data, port = tmp_path / device_id, free_port()
    shutil.copytree(plane.template, data)
    extra = ["--trusted-key", str(plane.bundles.pub), "--threads", "1"]
    token = cp.enrollment_token()
    proc = start_agent(
        data,
        cp.url,
        port,
        "--enroll-token",
        token,
        *extra,
        device_id=device_id,
        labels=labels,
        env=env,
    )
    agent = Agent(device_id, data, port, proc)
    wait_for(
        f"{device_id} to report 1.0.0",
        lambda: (
            cp.device(device_id) if any(d["device_id"] == device_id for d in cp.devices()) else {}
        ).get("active"),
        30,
    )
    return agent


@pytest.mark.parametrize(
    "phase",
    [
        "download-mid",
        "verify",
        "install",
        "health",
        "switch",
        "switched",
    ],
)
def test_kill_9_during_a_rollout_then_restart_completes_it(
    crash_plane: CrashPlane, tmp_path: Path, phase: str
) -> None:
    cp = crash_plane.cp
    device_id = f"crash-{phase}"
    agent = _agent_on_v1(crash_plane, tmp_path, device_id, f"phase={phase}", {CRASH_ENV: phase})
    try:
        rid = cp.apply(f"crash-{phase}", spec({"phase": phase}, "1.1.0", immediate_rollout()))
        assert rid is not None
        wait_for(
            "the agent to die (or the rollout to end)",
            lambda: agent.proc.poll() is not None or cp.rollout(rid)["status"] != "running",
            60,
        )
        assert agent.proc.poll() == -signal.SIGKILL, agent.log()

        # what a restart finds: a complete model, the old one or (after the switch) the new one
        store = SlotStore(agent.data)
        rec = store.recover(full=True)
        expect = "1.1.0" if phase == "switched" else "1.0.0"
        assert rec.active is not None and rec.active.version == expect, rec.actions
        path, model = store.active()  # type: ignore[misc]
        assert store.check(path.name, model, full=True) is None  # type: ignore[arg-type]

        agent.proc = start_agent(
            agent.data,
            cp.url,
            agent.port,
            "--trusted-key",
            str(crash_plane.bundles.pub),
            "--threads",
            "1",
            device_id=device_id,
            labels=f"phase={phase}",
        )
        done = cp.wait_rollout(rid, 60)
        assert done["status"] == "succeeded", done
        assert entries(done)[device_id]["status"] == "active"
        wait_active(agent, "1.1.0")
        r = chat(agent.port)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == f"{NAME}:1.1.0"
    finally:
        stop_agent(agent.proc)


def test_tampered_blob_in_the_registry_fails_the_canary_at_verifying(
    crash_plane: CrashPlane, tmp_path: Path
) -> None:
    cp, bundles = crash_plane.cp, crash_plane.bundles
    blobs = (bundles.v2 / "blobs" / "sha256").iterdir()
    weights = cp.blob("sha256:" + max(blobs, key=lambda p: p.stat().st_size).name)
    original = weights.read_bytes()
    tampered = bytearray(original)
    middle = len(tampered) // 2
    tampered[middle : middle + 16] = bytes(b ^ 0xFF for b in tampered[middle : middle + 16])
    agents = [
        _agent_on_v1(crash_plane, tmp_path, f"tamper-{i}", "group=tamper", None) for i in (1, 2)
    ]
    try:
        weights.write_bytes(bytes(tampered))  # same size, other bytes: only a digest can tell
        rid = cp.apply("tamper", spec({"group": "tamper"}, "1.1.0", staged(soak=0)))
        assert rid is not None
        done = cp.wait_rollout(rid, 60)
        assert done["status"] == "rolled-back", done
        moved = entries(done)
        canary = [d for d in moved.values() if d["wave"] is not None]
        assert len(canary) == 1, moved
        assert canary[0]["failed_stage"] == "verifying", canary[0]
        for a in agents:
            assert a.proc.poll() is None, a.log()
            assert active(a.data)["version"] == "1.0.0"
            assert chat(a.port).json()["model"] == f"{NAME}:1.0.0"
            if a.device_id != canary[0]["device_id"]:
                assert "action 1.1.0" not in a.log()
    finally:
        weights.write_bytes(original)
        for a in agents:
            stop_agent(a.proc)


def test_an_interrupted_download_resumes_from_the_control_plane_registry(
    crash_plane: CrashPlane, desired: Any, tmp_path: Path
) -> None:
    """A .part left by an interrupted download is completed with a Range request to the
    control plane's registry (test_registry_source.py does the same against Debian's
    docker-registry); a .part with wrong bytes is caught by the digest."""
    from slmops.agent.fetch import RegistrySource
    from slmops.agent.verify_variant import VariantCheckError
    from slmops.bundle.layout import Manifest, OciLayout

    bundle = crash_plane.bundles.v2
    layout = OciLayout(bundle)
    manifest = Manifest.model_validate_json(
        layout.blob_path(desired(bundle, "1.1.0").manifest_digest).read_bytes()
    )
    layer = max(manifest.layers, key=lambda d: d.size)
    blob = layout.blob_path(layer.digest).read_bytes()
    dest, part = tmp_path / "blob", tmp_path / "blob.part"
    half = len(blob) // 2
    part.write_bytes(blob[:half])
    source = RegistrySource(crash_plane.cp.url, NAME, token=crash_plane.cp.admin)
    try:
        stats = source.fetch_blob(layer, dest)
        assert (stats.resumed, stats.bytes) == (half, len(blob) - half)
        assert dest.read_bytes() == blob and not part.exists()
        dest.unlink()
        part.write_bytes(b"\0" * half)
        with pytest.raises(VariantCheckError, match="does not match"):
            source.fetch_blob(layer, dest)
        assert not part.exists() and not dest.exists()
    finally:
        source.close()


def test_a_version_reshipping_an_unchanged_variant_is_reported_as_the_new_version(
    crash_plane: CrashPlane, tmp_path: Path
) -> None:
    from slmops.bundle.build import build_bundle
    from slmops.bundle.signing import sign_bundle

    cp, bundles = crash_plane.cp, crash_plane.bundles
    built_in = bundles.v1.parent  # the variants and report 1.0.0 was built from
    same = build_bundle(
        built_in / "variants-1.0.0",
        built_in / "report-1.0.0",
        name=NAME,
        version="1.0.2",
        out=tmp_path / "bundle-1.0.2",
    ).path
    sign_bundle(same, bundles.priv)
    cp.push(same, NAME, "1.0.2")
    agent = _agent_on_v1(crash_plane, tmp_path, "same-1", "group=same", None)
    try:
        rid = cp.apply("same", spec({"group": "same"}, "1.0.2", immediate_rollout()))
        assert rid is not None
        assert cp.wait_rollout(rid, 30)["status"] == "succeeded"
        assert "action 1.0.2 active already running" in agent.log()
        wait_active(agent, "1.0.2", timeout=3)
    finally:
        stop_agent(agent.proc)
