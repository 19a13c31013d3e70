"""RegistrySource against a real OCI registry (Debian's docker-registry): install and Range resume.

The registry helpers come from tests/bundle/conftest.py, loaded by path (as bench/ does), so
there is one way to run a throwaway registry in this repository.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from factories.registry import registry_helpers
from slmops.agent.fetch import RegistrySource
from slmops.agent.install import Installer
from slmops.agent.slots import SlotStore
from slmops.agent.verify_variant import VariantCheckError
from slmops.bundle.layout import Descriptor, Manifest, OciLayout
from slmops.bundle.registry import push
from slmops.protocol.device import DesiredModel
from slmops.protocol.fleet import DeviceActionState as S

Desired = Callable[[Path, str], DesiredModel]


@pytest.fixture(scope="module")
def pushed(bundles: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    helpers = registry_helpers()
    if not helpers.REGISTRY_BIN.is_file():
        pytest.fail(f"{helpers.REGISTRY_BIN} is missing: {helpers.INSTALL_HINT}", pytrace=False)
    with helpers.run_registry(tmp_path_factory.mktemp("agent-registry")) as server:
        push(bundles.v2, f"oci://{server.address}/acme/bot:1.1.0")
        yield server.address


def _weights(bundle: Path, desired: DesiredModel) -> Descriptor:
    layout = OciLayout(bundle)
    m = Manifest.model_validate(json.loads(layout.blob_path(desired.manifest_digest).read_bytes()))
    return max(m.layers, key=lambda d: d.size)


def test_install_from_registry(pushed: str, bundles: Any, desired: Desired, tmp_path: Path) -> None:
    source = RegistrySource(pushed, "acme/bot")
    try:
        final = Installer(tmp_path / "data", [bundles.pub], threads=1).apply(
            desired(bundles.v2, "1.1.0"), source, lambda s: None
        )
    finally:
        source.close()
    assert final.state is S.ACTIVE, final.detail
    assert SlotStore(tmp_path / "data").active()[1].version == "1.1.0"  # type: ignore[index]


def test_range_resume_and_corrupt_part(
    pushed: str, bundles: Any, desired: Desired, tmp_path: Path
) -> None:
    want = desired(bundles.v2, "1.1.0")
    layer = _weights(bundles.v2, want)
    blob = OciLayout(bundles.v2).blob_path(layer.digest).read_bytes()
    dest = tmp_path / "blob"
    part = tmp_path / "blob.part"
    half = len(blob) // 2
    part.write_bytes(blob[:half])
    source = RegistrySource(f"http://{pushed}", "acme/bot")
    try:
        stats = source.fetch_blob(layer, dest)
        assert (stats.resumed, stats.bytes) == (half, len(blob) - half)
        assert dest.read_bytes() == blob and not part.exists()
        dest.unlink()
        part.write_bytes(b"\0" * half)  # a .part whose bytes are wrong: caught by the digest
        with pytest.raises(VariantCheckError, match="does not match"):
            source.fetch_blob(layer, dest)
        assert not part.exists() and not dest.exists()
    finally:
        source.close()
