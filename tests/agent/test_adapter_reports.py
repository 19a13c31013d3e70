"""Adapter changes as rollout reports: every adapter status carries the desired model's rollout
id; when only the adapter changes the model's "already running" is not reported (the adapter's
own outcome is the device's report); a failed adapter is not retried until the desired state
changes or the agent restarts; a revert reports rolled-back.

In-process: the real AdapterInstaller (real signature checks, real llama.cpp health check in
its child process) and the real agent loop's `_apply_if_needed`, fetching from a real OCI
registry (Debian's docker-registry). The agent has no credential here, so `_report` only queues
(nothing is posted); the statuses are recorded as `_report` receives them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter_fixtures import adapter_desired
from factories.registry import registry_helpers
from slmops.agent.adapter_slots import AdapterSlots
from slmops.agent.adapters import AdapterInstaller
from slmops.agent.config import AgentConfig
from slmops.agent.daemon import Agent
from slmops.agent.fetch import LayoutSource
from slmops.agent.slots import SlotStore
from slmops.bundle.registry import push
from slmops.bundle.signing import load_trusted_keys
from slmops.protocol.device import ActionStatus, DesiredModel, DesiredState
from slmops.protocol.fleet import DeviceActionState as S

Desired = Callable[[Path, str], DesiredModel]
FLOW = [S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.HEALTH_CHECKING, S.ACTIVE]


def _apply(
    data: Path, bundles: Any, model: DesiredModel, artifact: Path
) -> tuple[ActionStatus, list[ActionStatus]]:
    seen: list[ActionStatus] = []
    installer = AdapterInstaller(data, load_trusted_keys([bundles.pub]), threads=1)
    running = SlotStore(data).active()
    assert running is not None
    final = installer.apply(model, running, LayoutSource(artifact), seen.append)
    return final, seen


def test_installer_statuses_carry_the_rollout(
    model_data: Path,
    bundles: Any,
    adapters: dict[str, Path],
    desired: Desired,
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    shutil.copytree(model_data, data)
    base = desired(bundles.v1, "1.0.0")
    slots = AdapterSlots(data)

    def want(site: str, rollout: str, revert: bool = False) -> DesiredModel:
        update = {"adapter": adapter_desired(adapters[site]), "rollout_id": rollout}
        return base.model_copy(update=update | {"revert": revert})

    final, seen = _apply(data, bundles, want("s1", "ra-1"), adapters["s1"])
    assert [s.state for s in seen] == FLOW, final.detail
    assert {s.rollout_id for s in seen} == {"ra-1"}
    assert {s.version for s in seen} == {"adapter store-s1:1.0.0"}

    # refused (unsigned): failed with its stage, under the rollout; store-s1 stays loaded
    final, seen = _apply(data, bundles, want("unsigned", "ra-2"), adapters["unsigned"])
    assert (final.state, final.stage, final.rollout_id) == (S.FAILED, S.VERIFYING, "ra-2")
    assert {s.rollout_id for s in seen} == {"ra-2"} and "not signed" in final.detail
    assert slots.active()[1].name == "store-s1"  # type: ignore[index]

    assert _apply(data, bundles, want("s2", "ra-3"), adapters["s2"])[0].state is S.ACTIVE
    # the control plane reverts: back to the kept adapter, instantly, reported rolled-back
    final, seen = _apply(data, bundles, want("s1", "ra-3", revert=True), adapters["s1"])
    assert [(s.state, s.rollout_id) for s in seen] == [(S.ROLLED_BACK, "ra-3")], final.detail
    assert "switched back" in final.detail and final.stage is None
    assert slots.active()[1].name == "store-s1"  # type: ignore[index]

    installer = AdapterInstaller(data, {}, threads=1)
    # unloading in a rollout: active (the desired state is reached) or rolled-back (a revert)
    gone = installer.unload(lambda s: None, rollout_id="ra-4")
    assert gone is not None and (gone.state, gone.rollout_id) == (S.ACTIVE, "ra-4")
    assert slots.active() is None
    slots.rollback()  # store-s1 again
    gone = installer.unload(lambda s: None, rollout_id="ra-4", revert=True)
    assert gone is not None and (gone.state, gone.rollout_id) == (S.ROLLED_BACK, "ra-4")
    slots.rollback()
    gone = installer.unload(lambda s: None)  # no rollout: as before
    assert gone is not None and (gone.state, gone.rollout_id) == (S.ROLLED_BACK, None)
    assert installer.unload(lambda s: None, rollout_id="ra-5") is None  # nothing loaded


# --- the agent loop ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(adapters: dict[str, Path]) -> Iterator[str]:
    helpers = registry_helpers()
    if not helpers.REGISTRY_BIN.is_file():
        pytest.fail(f"{helpers.REGISTRY_BIN} is missing: {helpers.INSTALL_HINT}", pytrace=False)
    root = adapters["s1"].parent / "registry"
    with helpers.run_registry(root) as server:
        for site, name in (("s1", "store-s1"), ("s2", "store-s2"), ("unsigned", "store-x")):
            push(adapters[site], f"oci://{server.address}/{name}:1.0.0")
        yield f"http://{server.address}"


class Loop:
    """The agent (never started: no API, no check-in) over a data dir that runs acme/bot:1.0.0;
    `apply` runs the loop's `_apply_if_needed` and returns what it reported."""

    def __init__(self, server: str, data: Path, pub: Path) -> None:
        cfg = AgentConfig(server=server, data_dir=data, trusted_keys=[pub], threads=1)
        self.agent = Agent(cfg)
        self.reported: list[ActionStatus] = []
        real = self.agent._report

        def record(st: ActionStatus) -> None:
            self.reported.append(st)
            real(st)

        self.agent._report = record  # type: ignore[method-assign]

    def apply(self, model: DesiredModel) -> list[ActionStatus]:
        start = len(self.reported)
        self.agent._apply_if_needed(DesiredState(device_id="edge-1", model=model))
        return self.reported[start:]

    def loaded(self) -> str | None:
        model = self.agent.store.active()
        assert model is not None
        got = self.agent._adapters.loaded_for(model[1])
        return got[1].name if got else None

    def close(self) -> None:
        self.agent.client.close()
        with self.agent._serve_lock:
            if self.agent._served is not None:
                self.agent._served.runtime.close()


def test_agent_loop_reports_adapter_outcomes_for_the_rollout(
    registry: str,
    model_data: Path,
    bundles: Any,
    adapters: dict[str, Path],
    desired: Desired,
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    shutil.copytree(model_data, data)
    base = desired(bundles.v1, "1.0.0")
    loop = Loop(registry, data, bundles.pub)

    def want(site: str | None, rollout: str, revert: bool = False) -> DesiredModel:
        named = adapter_desired(adapters[site]) if site else None  # repository = its name
        return base.model_copy(update={"adapter": named, "rollout_id": rollout, "revert": revert})

    try:
        # an adapter-only rollout: the model already runs; only the adapter's statuses count
        seen = loop.apply(want("s1", "r1"))
        assert [s.state for s in seen] == FLOW, [s.detail for s in seen]
        assert all(s.rollout_id == "r1" and s.version.startswith("adapter ") for s in seen)
        assert loop.loaded() == "store-s1"
        # the same desired state again (nothing to change): the model's report, as before
        seen = loop.apply(want("s1", "r1"))
        assert [(s.version, s.state, s.rollout_id) for s in seen] == [("1.0.0", S.ACTIVE, "r1")]

        # a refused adapter: failed with its stage under the rollout, no model "active"
        seen = loop.apply(want("unsigned", "r2"))
        assert [(s.state, s.stage, s.rollout_id) for s in seen] == [
            (S.DOWNLOADING, None, "r2"),
            (S.FAILED, S.VERIFYING, "r2"),
        ]
        assert "not signed" in seen[-1].detail
        assert loop.loaded() == "store-s1"  # the previous adapter keeps serving
        served = loop.agent.serving()
        lora = getattr(served.runtime, "lora_path", None) if served else None
        assert served is not None and lora is not None
        assert loop.agent._adapters.active()[0] in lora.parents  # type: ignore[index]
        tokens, _ = served.runtime.generate(served.runtime.tokenize("Store s1:"), 2)
        assert tokens
        # the next poll with the same desired state: no retry, nothing reported
        assert loop.apply(want("unsigned", "r2")) == []
        # another rollout id is another desired state: retried (and refused again)
        seen = loop.apply(want("unsigned", "r3"))
        assert seen[-1].state is S.FAILED and seen[-1].rollout_id == "r3"
        # a restart forgets the failure: retried once more
        restarted = Loop(registry, data, bundles.pub)
        seen = restarted.apply(want("unsigned", "r3"))
        restarted.close()
        assert seen[-1].state is S.FAILED and seen[-1].rollout_id == "r3"

        # a switch, then the control plane reverts: back to the kept adapter, rolled-back
        seen = loop.apply(want("s2", "r4"))
        assert [s.state for s in seen] == FLOW and loop.loaded() == "store-s2"
        seen = loop.apply(want("s1", "r4", revert=True))
        assert [(s.version, s.state, s.rollout_id) for s in seen] == [
            ("adapter store-s1:1.0.0", S.ROLLED_BACK, "r4")
        ]
        assert loop.loaded() == "store-s1"
        # a reverted device told to run the model alone: unloads, rolled-back
        seen = loop.apply(want(None, "r5", revert=True))
        assert [(s.version, s.state, s.rollout_id) for s in seen] == [
            ("adapter store-s1:1.0.0", S.ROLLED_BACK, "r5")
        ]
        assert loop.loaded() is None
        # every status is queued for the next check-in (posted at once when enrolled)
        assert all(st.rollout_id for st in loop.agent.pending.values())
    finally:
        loop.close()


def test_a_new_model_with_an_adapter_step_reports_the_adapter_as_the_outcome(
    registry: str,
    model_data: Path,
    bundles: Any,
    adapters: dict[str, Path],
    desired: Desired,
    tmp_path: Path,
) -> None:
    """A release of a new model version *and* an adapter change: the model's own final state is
    not the device's outcome for the rollout (a wave could pass on it before the adapter is in
    place); the adapter step's final state is. With no adapter step, the model's state is."""
    for version, bundle in (("1.0.0", bundles.v1), ("1.1.0", bundles.v2)):
        push(bundle, f"oci://{registry.removeprefix('http://')}/acme/bot:{version}")
    data = tmp_path / "data"
    shutil.copytree(model_data, data)
    loop = Loop(registry, data, bundles.pub)
    v1, v2 = desired(bundles.v1, "1.0.0"), desired(bundles.v2, "1.1.0")
    try:
        s1 = adapter_desired(adapters["s1"])
        seen = loop.apply(v1.model_copy(update={"adapter": s1, "rollout_id": "r1"}))
        assert seen[-1].state is S.ACTIVE and loop.loaded() == "store-s1"
        # 1.1.0 with an adapter the device refuses (unsigned): the model installs, and only
        # the adapter's failure speaks for the rollout (the model's "active" is logged)
        bad = adapter_desired(adapters["unsigned"])
        seen = loop.apply(v2.model_copy(update={"adapter": bad, "rollout_id": "r2"}))
        for_rollout = [(s.version, s.state) for s in seen if s.rollout_id == "r2"]
        assert ("1.1.0", S.ACTIVE) not in for_rollout, for_rollout
        assert any(s.version == "1.1.0" and s.state is S.ACTIVE for s in seen)
        assert for_rollout[-1] == ("adapter store-x:1.0.0", S.FAILED), for_rollout
        assert loop.agent.store.active()[1].version == "1.1.0"  # type: ignore[index]
        # the release with no adapter: the unload is the adapter step, and its state speaks
        seen = loop.apply(v2.model_copy(update={"rollout_id": "r3"}))
        for_rollout = [(s.version, s.state) for s in seen if s.rollout_id == "r3"]
        assert for_rollout and for_rollout[-1][0].startswith("adapter "), for_rollout
        assert for_rollout[-1][1] is S.ACTIVE and loop.loaded() is None
        # back to 1.0.0, nothing loaded and none asked for: the model's own state decides
        seen = loop.apply(v1.model_copy(update={"rollout_id": "r4"}))
        for_rollout = [(s.version, s.state) for s in seen if s.rollout_id == "r4"]
        assert for_rollout[-1] == ("1.0.0", S.ACTIVE), for_rollout
    finally:
        loop.close()
