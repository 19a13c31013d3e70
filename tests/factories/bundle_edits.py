"""Edit a built OCI bundle in place (top index, image index, manifests) re-linking digests, so
verification tests can tamper with one level at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slmops.bundle.layout import canonical_json
from slmops.bundle.verify import BundleVerificationError, verify_bundle
from slmops.core.errors import CheckFailedError

Json = dict[str, Any]


def _blob(bundle: Path, digest: str) -> Path:
    return bundle / "blobs" / "sha256" / digest.split(":", 1)[1]


def _load(bundle: Path, digest: str) -> Json:
    return json.loads(_blob(bundle, digest).read_bytes())


def _put(bundle: Path, obj: Json) -> tuple[str, int]:
    data = canonical_json(obj)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(bundle, digest).write_bytes(data)
    return digest, len(data)


def edit_top(bundle: Path, fn: Callable[[Json], None]) -> None:
    top = json.loads((bundle / "index.json").read_text())
    fn(top)
    (bundle / "index.json").write_text(json.dumps(top))


def edit_index(bundle: Path, fn: Callable[[Json], None]) -> None:
    def relink(top: Json) -> None:
        entry = top["manifests"][0]
        index = _load(bundle, entry["digest"])
        fn(index)
        entry["digest"], entry["size"] = _put(bundle, index)

    edit_top(bundle, relink)


def edit_manifest(bundle: Path, i: int, fn: Callable[[Json], None]) -> None:
    def relink(index: Json) -> None:
        entry = index["manifests"][i]
        manifest = _load(bundle, entry["digest"])
        fn(manifest)
        entry["digest"], entry["size"] = _put(bundle, manifest)

    edit_index(bundle, relink)


def manifest(bundle: Path, i: int) -> Json:
    top = json.loads((bundle / "index.json").read_text())
    return _load(bundle, _load(bundle, top["manifests"][0]["digest"])["manifests"][i]["digest"])


def fails(bundle: Path, *needles: str) -> str:
    with pytest.raises(BundleVerificationError) as exc:
        verify_bundle(bundle, [], require_signature=False)
    assert isinstance(exc.value, CheckFailedError) and exc.value.exit_code == 1
    text = str(exc.value)
    for needle in needles:
        assert needle in text, text
    return text
