"""The install path end to end on real signed GGUF bundles, real llama.cpp health checks."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slmops.agent.fetch import FetchStats, LayoutSource
from slmops.agent.install import Installer
from slmops.agent.slots import SlotStore
from slmops.bundle.layout import Descriptor
from slmops.protocol.device import ActionStatus, DesiredModel
from slmops.protocol.fleet import DeviceActionState as S

Desired = Callable[[Path, str], DesiredModel]
FLOW = [S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.HEALTH_CHECKING, S.ACTIVE]


def _installer(data: Path, keys: list[Path], **kw: float) -> Installer:
    return Installer(data, keys, threads=1, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def v1_data(bundles: Any, tmp_path_factory: pytest.TempPathFactory, desired: Desired) -> Path:
    """A data dir with 1.0.0 installed and active (copied by tests that change it)."""
    data = tmp_path_factory.mktemp("v1") / "data"
    seen: list[ActionStatus] = []
    final = _installer(data, [bundles.pub]).apply(
        desired(bundles.v1, "1.0.0"), LayoutSource(bundles.v1), seen.append
    )
    assert final.state is S.ACTIVE, final.detail
    assert [s.state for s in seen] == FLOW
    assert "tokens" in final.detail
    return data


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


def _active_version(data: Path) -> str | None:
    got = SlotStore(data).active()
    return got[1].version if got else None


def test_install_first_version_serves(v1_data: Path, bundles: Any, desired: Desired) -> None:
    path, model = SlotStore(v1_data).active()  # type: ignore[misc]
    assert (model.name, model.version, model.variant) == ("acme/bot", "1.0.0", "gguf-q8_0")
    assert list(path.glob("*.gguf")), "the variant's files are materialised under their titles"
    assert SlotStore(v1_data).check(path.name, model, full=True) is None  # type: ignore[arg-type]
    assert not any((v1_data / "staging").iterdir()), "staging is emptied after success"
    # applying the same target again is a no-op
    again = _installer(v1_data, [bundles.pub]).apply(
        desired(bundles.v1, "1.0.0"), LayoutSource(bundles.v1), lambda s: None
    )
    assert again.state is S.ACTIVE and again.detail == "already active"


def test_upgrade_keeps_previous_and_rollback_is_instant(
    v1_data: Path, bundles: Any, tmp_path: Path, desired: Desired
) -> None:
    data = _copy(v1_data, tmp_path)
    inst = _installer(data, [bundles.pub])
    final = inst.apply(desired(bundles.v2, "1.1.0"), LayoutSource(bundles.v2), lambda s: None)
    assert final.state is S.ACTIVE, final.detail
    store = SlotStore(data)
    assert _active_version(data) == "1.1.0"
    prev = store.previous()
    assert prev is not None and prev[1].version == "1.0.0"
    back = inst.revert(lambda s: None, rollout_id="r1")
    assert back.state is S.ROLLED_BACK and back.version == "1.0.0"
    assert _active_version(data) == "1.0.0"
    # a desired revert to the kept version is the same instant swap, no download
    revert = desired(bundles.v2, "1.1.0").model_copy(update={"revert": True})
    assert inst.apply(revert, LayoutSource(tmp_path / "nowhere"), lambda s: None).state is (
        S.ROLLED_BACK
    )
    assert _active_version(data) == "1.1.0"


def _tampered(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    blobs = sorted((copy / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    weights = blobs[-1]  # the biggest blob is the GGUF weights
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return copy


def test_tampered_blob_fails_at_verifying_and_old_keeps_serving(
    v1_data: Path, bundles: Any, tmp_path: Path, desired: Desired
) -> None:
    data = _copy(v1_data, tmp_path)
    final = _installer(data, [bundles.pub]).apply(
        desired(bundles.v2, "1.1.0"), LayoutSource(_tampered(bundles.v2, tmp_path)), print
    )
    assert (final.state, final.stage) == (S.FAILED, S.VERIFYING)
    assert "digest" in final.detail
    assert _active_version(data) == "1.0.0"


def test_untrusted_key_fails_at_verifying(
    v1_data: Path, bundles: Any, tmp_path: Path, desired: Desired
) -> None:
    data = _copy(v1_data, tmp_path)
    seen: list[ActionStatus] = []
    final = _installer(data, [bundles.other_pub]).apply(
        desired(bundles.v2, "1.1.0"), LayoutSource(bundles.v2), seen.append
    )
    assert (final.state, final.stage) == (S.FAILED, S.VERIFYING)
    assert "untrusted" in final.detail
    assert _active_version(data) == "1.0.0"
    assert not list((data / "staging").rglob("*.part")), "no layer was downloaded"


def test_health_failure_keeps_old_model(
    v1_data: Path, bundles: Any, tmp_path: Path, desired: Desired
) -> None:
    data = _copy(v1_data, tmp_path)
    final = _installer(data, [bundles.pub], max_latency_s=1e-6).apply(
        desired(bundles.v2, "1.1.0"), LayoutSource(bundles.v2), lambda s: None
    )
    assert (final.state, final.stage) == (S.FAILED, S.HEALTH_CHECKING)
    assert "too slow" in final.detail
    assert _active_version(data) == "1.0.0"
    assert SlotStore(data).recover().active.version == "1.0.0"  # type: ignore[union-attr]


class _DiskFull(LayoutSource):
    def fetch_blob(self, desc: Descriptor, dest: Path, *, resume: bool = True) -> FetchStats:
        if desc.size > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().fetch_blob(desc, dest, resume=resume)


def test_disk_full_is_reported_not_fatal(
    v1_data: Path, bundles: Any, tmp_path: Path, desired: Desired
) -> None:
    data = _copy(v1_data, tmp_path)
    final = _installer(data, [bundles.pub]).apply(
        desired(bundles.v2, "1.1.0"), _DiskFull(bundles.v2), lambda s: None
    )
    assert (final.state, final.stage) == (S.FAILED, S.DOWNLOADING)
    assert "no space left" in final.detail
    assert _active_version(data) == "1.0.0"


def test_recover_falls_back_when_active_slot_is_broken(
    v1_data: Path, bundles: Any, tmp_path: Path, desired: Desired
) -> None:
    data = _copy(v1_data, tmp_path)
    inst = _installer(data, [bundles.pub])
    assert inst.apply(
        desired(bundles.v2, "1.1.0"), LayoutSource(bundles.v2), lambda s: None
    ).state is (S.ACTIVE)
    path, _ = SlotStore(data).active()  # type: ignore[misc]
    gguf = next(path.glob("*.gguf"))
    gguf.write_bytes(gguf.read_bytes()[:100])  # a truncated weight file
    rec = SlotStore(data).recover()
    assert rec.active is not None and rec.active.version == "1.0.0"
    assert any("fell back" in a for a in rec.actions)
    assert SlotStore(data).previous() is None


def test_failed_post_switch_check_rolls_back(
    v1_data: Path, bundles: Any, desired: Desired, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot damaged right after the switch (disk fault) is caught and swapped back."""
    data = _copy(v1_data, tmp_path)
    real = SlotStore.switch_to

    def switch_then_damage(self: SlotStore, slot: Any, model: Any) -> None:
        real(self, slot, model)
        next(self.path(slot).glob("*.gguf")).write_bytes(b"GGUF")

    monkeypatch.setattr(SlotStore, "switch_to", switch_then_damage)
    final = _installer(data, [bundles.pub]).apply(
        desired(bundles.v2, "1.1.0"), LayoutSource(bundles.v2), lambda s: None
    )
    assert (final.state, final.stage) == (S.ROLLED_BACK, S.HEALTH_CHECKING)
    assert _active_version(data) == "1.0.0"
