"""LoRA adapters on the device: a real control plane assigns them by label, a real agent fetches
only the adapter's bytes, verifies, health-checks and loads base + adapter in llama.cpp, switches
adapters keeping the previous one, unloads; refusals leave the current adapter loaded; kill -9
during an adapter install leaves the device on its previous adapter.

Measured figures are printed (run with -s): bytes moved per adapter update against the adapter's
size, and the time from a blueprint change to the new adapter serving.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapter_fixtures import adapter_desired, write_gguf_header
from control_plane import ControlPlane, cli_json, immediate_rollout, start_agent, status, stop_agent
from control_plane import wait_for as _wait_for
from helpers import free_port
from slmops.agent import CRASH_ENV
from slmops.agent.adapter_slots import AdapterSlots
from slmops.agent.adapters import AdapterInstaller
from slmops.agent.fetch import LayoutSource
from slmops.agent.slots import SlotStore
from slmops.bundle import adapter_verify
from slmops.bundle.adapter import CARD_FILE
from slmops.bundle.adapter_meta import ADAPTER_FILE, AdapterDescriptor
from slmops.bundle.layout import Index, Manifest, OciLayout, parse_model
from slmops.bundle.media import MT_INDEX
from slmops.bundle.registry import push
from slmops.bundle.signing import load_trusted_keys, sign_bundle
from slmops.protocol.device import DesiredModel
from slmops.protocol.fleet import DeviceActionState as S

NAME = "acme/bot"
Desired = Callable[[Path, str], DesiredModel]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    return _wait_for(what, check, timeout)


def layer_size(artifact: Path) -> int:
    return adapter_desired(artifact).size


def _read(artifact: Path) -> tuple[Index, Manifest]:
    layout = OciLayout(artifact)
    root = next(d for d in layout.read_index().manifests if d.media_type == MT_INDEX)
    index = parse_model(Index, json.loads(layout.blob_path(root.digest).read_bytes()), where="t")
    entry = index.manifests[0]
    m = parse_model(Manifest, json.loads(layout.blob_path(entry.digest).read_bytes()), where="t")
    return index, m


def descriptor_of(artifact: Path) -> AdapterDescriptor:
    config = _read(artifact)[1].config
    return AdapterDescriptor.model_validate_json(
        OciLayout(artifact).blob_path(config.digest).read_bytes()
    )


def forged(artifact: Path, out: Path, priv: Path, gguf: bytes, **desc: Any) -> Path:
    """A signed artifact for the same base whose adapter.gguf is `gguf` and whose descriptor
    is the real one with `desc` changes: what a broken build pipeline holding the fleet's key
    could ship (`bundle-adapter` refuses to write one), so the device must catch it."""
    from slmops.bundle.adapter import _write

    layout = OciLayout(artifact)
    index, m = _read(artifact)
    real = descriptor_of(artifact)
    src = out.with_name(out.name + "-src")
    src.mkdir()
    (src / ADAPTER_FILE).write_bytes(gguf)
    card = next(x for x in m.layers if x.annotation("org.opencontainers.image.title") == CARD_FILE)
    shutil.copyfile(layout.blob_path(card.digest), src / CARD_FILE)
    descriptor = real.model_copy(update={"disk_bytes": len(gguf), **desc})
    assert index.subject is not None
    _write(OciLayout.init(out), src, descriptor, index.subject, "2026-01-01T00:00:00+00:00")
    # `slmops sign` checks the LoRA header before signing, so that check is switched off for
    # this one signature (the agent binds its own reference at import: it still checks)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapter_verify, "check_adapter_gguf", lambda *a, **k: None)
        sign_bundle(out, priv)
    return out


# --- in-process: verification and refusals ------------------------------------------------------


def _apply(data: Path, bundles: Any, model: DesiredModel, artifact: Path) -> Any:
    installer = AdapterInstaller(data, load_trusted_keys([bundles.pub]), threads=1)
    running = SlotStore(data).active()
    assert running is not None
    return installer.apply(model, running, LayoutSource(artifact), lambda s: None)


def test_install_switch_rollback_and_refusals(
    model_data: Path, bundles: Any, adapters: dict[str, Path], desired: Desired, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(model_data, data)
    base = desired(bundles.v1, "1.0.0")
    slots = AdapterSlots(data)

    def want(art: Path) -> DesiredModel:
        return base.model_copy(update={"adapter": adapter_desired(art)})

    first = _apply(data, bundles, want(adapters["s1"]), adapters["s1"])
    assert first.state is S.ACTIVE and first.version == "adapter store-s1:1.0.0", first.detail
    model = SlotStore(data).active()[1]  # type: ignore[index]
    assert slots.loaded_for(model)[1].name == "store-s1"  # type: ignore[index]

    def refused(model_want: DesiredModel, art: Path, stage: S, text: str) -> None:
        st = _apply(data, bundles, model_want, art)
        assert (st.state, st.stage) == (S.FAILED, stage), st.detail
        assert text in st.detail
        assert slots.active()[1].name == "store-s1"  # type: ignore[index]  # still loaded

    # unsigned: refused before its LoRA bytes are fetched
    refused(want(adapters["unsigned"]), adapters["unsigned"], S.VERIFYING, "not signed")
    # the control plane named another base (bundle) than the adapter's subject
    other = want(adapters["s2"]).model_copy(update={"bundle_digest": "sha256:" + "0" * 64})
    refused(other, adapters["s2"], S.VERIFYING, "is for acme/bot:1.0.0")
    # a corrupt LoRA layer: caught by its digest
    broken = tmp_path / "broken"
    shutil.copytree(adapters["s2"], broken)
    blob = OciLayout(broken).blob_path(adapter_desired(broken).layer_digest)
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    blob.write_bytes(bytes(raw))
    refused(want(broken), broken, S.VERIFYING, "does not match")

    # signed by the fleet's key, for this base, yet unfit: the device reads the GGUF header
    real = descriptor_of(adapters["s2"])
    header = tmp_path / "header.gguf"

    def signed(name: str, gguf: bytes, **desc: Any) -> Path:
        return forged(adapters["s2"], tmp_path / name, bundles.priv, gguf, **desc)

    # wrong rank: the LoRA pairs are rank 4, the signed descriptor says otherwise
    write_gguf_header(
        header,
        {
            f"{k}.{p}": d
            for k, (i, o) in real.shapes.items()
            for p, d in (("lora_a", (i, 4)), ("lora_b", (4, o)))
        },
    )
    art = signed("rank", header.read_bytes())
    refused(want(art), art, S.VERIFYING, f"LoRA rank 4, the descriptor says {real.rank}")
    # wrong shape: a LoRA for a wider model (its descriptor agrees), not this base's tensors
    r = real.rank
    write_gguf_header(
        header,
        {"blk.0.attn_q.weight.lora_a": (96, r), "blk.0.attn_q.weight.lora_b": (r, 96)},
    )
    art = signed("wide", header.read_bytes(), shapes={"blk.0.attn_q.weight": [96, 96]})
    refused(want(art), art, S.VERIFYING, "does not fit the base: blk.0.attn_q.weight is [64, 64]")
    # a corrupt (truncated) adapter file, signed as it is: its digest matches, its header not
    raw = OciLayout(adapters["s2"]).blob_path(adapter_desired(adapters["s2"]).layer_digest)
    art = signed("cut", raw.read_bytes()[:200])
    refused(want(art), art, S.VERIFYING, "adapter.gguf: GGUF header is truncated")
    served = slots.loaded_for(model)
    assert served is not None and served[1].name == "store-s1"  # what the API loads

    # a second adapter: the first is kept; asking for it again is an instant switch back
    t0 = time.perf_counter()
    second = _apply(data, bundles, want(adapters["s2"]), adapters["s2"])
    install_s = time.perf_counter() - t0
    assert second.state is S.ACTIVE, second.detail
    assert (slots.active()[1].name, slots.previous()[1].name) == ("store-s2", "store-s1")  # type: ignore[index]
    t0 = time.perf_counter()
    back = _apply(data, bundles, want(adapters["s1"]), adapters["s1"])
    switch_s = time.perf_counter() - t0
    assert back.state is S.ACTIVE and "switched back" in back.detail
    assert slots.active()[1].name == "store-s1"  # type: ignore[index]
    print(
        f"\nadapter install (verify + health check): {install_s:.2f} s; switch back {switch_s:.3f} s"
    )


# --- kill -9 during an adapter install ----------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
from slmops.agent.adapters import AdapterInstaller
from slmops.agent.fetch import LayoutSource
from slmops.agent.slots import SlotStore
from slmops.bundle.signing import load_trusted_keys
from slmops.protocol.device import DesiredModel
data, art, pub, want = sys.argv[1:5]
inst = AdapterInstaller(Path(data), load_trusted_keys([Path(pub)]), threads=1)
final = inst.apply(
    DesiredModel.model_validate_json(want), SlotStore(Path(data)).active(),
    LayoutSource(Path(art)), lambda s: print(s.state.value, flush=True),
)
print("final", final.state.value, final.detail, flush=True)
"""


@pytest.mark.parametrize("phase", ["adapter-verify", "adapter-install", "adapter-switch"])
def test_kill_9_during_adapter_install_keeps_the_previous_adapter(
    model_data: Path,
    bundles: Any,
    adapters: dict[str, Path],
    desired: Desired,
    tmp_path: Path,
    phase: str,
) -> None:
    data = tmp_path / "data"
    shutil.copytree(model_data, data)
    base = desired(bundles.v1, "1.0.0")
    first = base.model_copy(update={"adapter": adapter_desired(adapters["s1"])})
    assert _apply(data, bundles, first, adapters["s1"]).state is S.ACTIVE
    second = base.model_copy(update={"adapter": adapter_desired(adapters["s2"])})
    args = [str(data), str(adapters["s2"]), str(bundles.pub), second.model_dump_json()]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        env={**os.environ, CRASH_ENV: phase},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stdout + proc.stderr  # SIGKILL, no cleanup ran
    slots = AdapterSlots(data)
    rec = slots.recover(full=True)
    model = SlotStore(data).active()[1]  # type: ignore[index]
    loaded = slots.loaded_for(model)
    assert loaded is not None and loaded[1].name == "store-s1", rec.actions
    assert slots.check(slots.state().active, slots.active()[1], full=True) is None  # type: ignore[arg-type, index]
    # the next apply (the agent's restart) completes the interrupted install
    assert _apply(data, bundles, second, adapters["s2"]).state is S.ACTIVE


# --- end to end: control plane, blueprint by label, real agent ---------------------------------


def spec(*assignments: dict[str, str]) -> dict[str, Any]:
    return {
        "selector": {"room": "lab"},
        "model": {"name": NAME, "version": "1.0.0"},
        "rollout": immediate_rollout(),
        "adapters": list(assignments),
    }


def test_agent_gets_only_the_adapter_by_label(
    adapter_plane: ControlPlane,
    model_data: Path,
    bundles: Any,
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    cp = adapter_plane
    data, port = tmp_path / "agent", free_port()
    shutil.copytree(model_data, data)  # the device already runs acme/bot:1.0.0
    cp.push(bundles.v1, NAME, "1.0.0")
    for site in ("s1", "s2"):
        push(adapters[site], f"oci://127.0.0.1:{cp.port}/store-{site}:1.0.0", token=cp.admin)
    push(adapters["unsigned"], f"oci://127.0.0.1:{cp.port}/store-x:1.0.0", token=cp.admin)
    s1 = {"selector": {"site": "s1"}, "adapter": "store-s1", "version": "1.0.0"}
    s2 = {"selector": {"site": "s1", "room": "lab"}, "adapter": "store-s2", "version": "1.0.0"}
    anyone = {"selector": {}, "adapter": "store-x", "version": "1.0.0"}
    token = cli_json("enrollment-token", "create", "--data", cp.data)["token"]
    trust = ("--trusted-key", str(bundles.pub), "--threads", "1")
    state = data / "slots" / "state.json"
    model_state = state.read_bytes()
    agent = start_agent(
        data, cp.url, port, "--enroll-token", token, *trust, labels="room=lab,site=s1"
    )
    api = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for("the model reported", lambda: cp.devices() and cp.devices()[0]["active"])
        cp.apply("shops", spec(anyone, s1))
        first = wait_for(
            "store-s1 loaded", lambda: (status(data).get("adapter") or {}).get("name") == "store-s1"
        )
        assert first
        moved = status(data)["adapter_fetch"]
        size = layer_size(adapters["s1"])
        assert moved["layer_bytes"] == size  # the LoRA layer, once
        assert moved["layer_bytes"] + moved["metadata_bytes"] <= 1.05 * size, moved
        assert state.read_bytes() == model_state  # the model slots never changed
        assert not any((data / "staging").rglob("*"))  # and no base byte was staged
        dev = wait_for(
            "the adapter reported",
            lambda: (cp.device("edge-1")["active"] or {}).get("adapter") and cp.device("edge-1"),
        )
        assert dev["active"]["adapter"]["name"] == "store-s1"
        r = httpx.post(
            api + "/completions",
            json={"model": NAME, "prompt": "Store s1:", "max_tokens": 4},
            timeout=30,
        )
        assert r.status_code == 200, r.text

        # the more specific selector takes another adapter: only its bytes move, the first is kept
        t0 = time.monotonic()
        cp.apply("shops", spec(anyone, s1, s2))
        wait_for(
            "store-s2 loaded", lambda: (status(data).get("adapter") or {}).get("name") == "store-s2"
        )
        switch_s = time.monotonic() - t0
        moved2 = status(data)["adapter_fetch"]
        assert moved2["layer_bytes"] == layer_size(adapters["s2"])
        assert AdapterSlots(data).previous()[1].name == "store-s1"  # type: ignore[index]
        assert state.read_bytes() == model_state
        r = httpx.post(
            api + "/completions",
            json={"model": NAME, "prompt": "Store s2:", "max_tokens": 4},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        print(
            f"\nadapter update: {moved2['layer_bytes'] + moved2['metadata_bytes']} bytes moved for "
            f"a {moved2['layer_bytes']}-byte adapter "
            f"({(moved2['layer_bytes'] + moved2['metadata_bytes']) / moved2['layer_bytes']:.3f}x); "
            f"install {moved2['seconds']:.2f} s; blueprint change to serving {switch_s:.2f} s"
        )

        # only the unsigned adapter matches: the release cannot be placed on the device, so it
        # keeps the adapter it runs; the rollout pauses with the reason and the device's
        # desired state says why (an unsigned adapter never reaches a device)
        rid = cp.apply("shops", spec(anyone))
        assert rid is not None
        paused = wait_for("the rollout pauses", lambda: cp.rollout(rid)["status"] == "paused")
        assert paused
        reasons = cp.rollout(rid)["unplaceable"]
        assert any("store-x:N.N is not signed" in why for why in reasons), reasons  # folded

        def told_why() -> str:
            doc = json.loads((data / "desired.json").read_text())
            return str(doc.get("unplaceable") or "")

        assert "store-x:1.0.0 is not signed" in wait_for("the reason", told_why)
        desired = json.loads((data / "desired.json").read_text())
        assert desired["model"]["adapter"]["name"] == "store-s2"
        assert (status(data).get("adapter") or {}).get("name") == "store-s2"
        r = httpx.post(
            api + "/completions",
            json={"model": NAME, "prompt": "Store:", "max_tokens": 4},
            timeout=30,
        )
        assert r.status_code == 200, r.text
    finally:
        stop_agent(agent)
