"""`inspect_bundle`: what a bundle holds, read from manifests only, signers listed unverified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factories.bundles import VARIANTS, build
from slmops.bundle.inspect import inspect_bundle
from slmops.bundle.layout import BundleFormatError
from slmops.core.errors import UserInputError


def test_inspect_layout_and_tar_agree(tmp_path: Path) -> None:
    layout = inspect_bundle(build(tmp_path))
    tar = inspect_bundle(build(tmp_path, tmp_path / "b.tar", format="tar"))
    assert {k: v for k, v in layout.items() if k != "path"} == {
        k: v for k, v in tar.items() if k != "path"
    }
    assert layout["name"] == "acme/bot" and layout["version"] == "1.0.0"
    assert layout["created"] == "2026-02-02T00:00:00+00:00"  # the report's time: reproducible
    assert [v["name"] for v in layout["variants"]] == list(VARIANTS)
    assert layout["signed_by"] == [] and layout["signatures_verified"] is False
    assert "not verified" in layout["note"]
    assert layout["total_bytes"] == sum(
        p.stat().st_size for p in (tmp_path / "bundle" / "blobs" / "sha256").iterdir()
    )
    json.dumps(layout)  # plain data, ready for --json


def test_inspect_refuses_what_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="bundle not found"):
        inspect_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleFormatError, match="oci-layout is missing"):
        inspect_bundle(tmp_path / "empty")
