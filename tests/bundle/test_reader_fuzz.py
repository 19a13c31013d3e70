"""Property-based fuzz of the bundle readers: the tar reader (tarball.py) and the OCI layout
reader (layout.py), through `verify_bundle`, the path every `slmops verify` and install takes.

Mutated archives (bytes flipped, cut short, garbage spliced in) and mutated ``index.json`` files
(random JSON, and a valid index with one field replaced by a random value) may only ever raise
the project's own errors (SlmopsError: exit 1 or 2 with a message naming what is wrong), never
an unhandled exception, and never pass verification with altered content.

Bounded: 100 examples per property, well under a minute in all.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factories.bundles import build
from slmops.bundle.layout import OciLayout
from slmops.bundle.tarball import open_bundle, write_tar
from slmops.bundle.verify import verify_bundle
from slmops.core.errors import SlmopsError

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Pristine:
    layout: Path
    tar: Path
    digest: str  # the bundle digest every successful verification must report

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Pristine({self.tar})"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    root = tmp_path_factory.mktemp("reader-fuzz")
    layout = build(root)
    tar = write_tar(layout, root / "bundle.tar")
    res = verify_bundle(tar, [], require_signature=False)  # the unmutated bundle passes
    return Pristine(layout, tar, res.digest)


def _verified_digest(path: Path) -> str | None:
    """Verify and read the index and each listed blob's size: the bundle digest when it all
    passed, None when it was refused with one of the project's own errors."""
    try:
        res = verify_bundle(path, [], require_signature=False)
        with open_bundle(path) as reader:
            for d in reader.read_index().manifests:
                reader.blob_size(d.digest)
    except SlmopsError as exc:
        assert exc.exit_code in (1, 2) and exc.render(), exc
        return None
    return res.digest


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(
        ["sha256:" + "0" * 64, "sha256:../../x", "application/vnd.oci.image.index.v1+json"]
    )
)
json_any = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=12,
)
edits = st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(
    flips=edits,
    cut=st.none() | st.integers(0, 10**9),
    splice=st.none() | st.tuples(st.integers(0, 10**9), st.binary(min_size=1, max_size=600)),
)
def test_mutated_tarball_raises_only_our_errors(
    pristine: Pristine,
    tmp_path_factory: pytest.TempPathFactory,
    flips: list[tuple[int, int]],
    cut: int | None,
    splice: tuple[int, bytes] | None,
) -> None:
    data = bytearray(pristine.tar.read_bytes())
    for pos, byte in flips:
        data[pos % len(data)] = byte
    if splice is not None:
        at = splice[0] % len(data)
        data[at:at] = splice[1]
    if cut is not None:
        del data[cut % len(data) :]
    path = tmp_path_factory.mktemp("tar") / "bundle.tar"
    path.write_bytes(bytes(data))
    got = _verified_digest(path)
    # still valid only if nothing that matters changed (a flip in tar padding, say)
    assert got in (None, pristine.digest)


def _valid_index(layout: Path) -> dict[str, Any]:
    return json.loads((layout / "index.json").read_text())


@FUZZ
@given(
    how=st.sampled_from(["replace", "field", "entry-field"]),
    key=st.sampled_from(
        ["manifests", "schemaVersion", "mediaType", "digest", "size", "annotations", "artifactType"]
    ),
    value=json_any,
)
def test_mutated_index_json_raises_only_our_errors(
    pristine: Pristine,
    tmp_path_factory: pytest.TempPathFactory,
    how: str,
    key: str,
    value: Any,
) -> None:
    layout = pristine.layout
    copy = tmp_path_factory.mktemp("layout") / "bundle"
    shutil.copytree(layout, copy, copy_function=os.link)  # blobs are not mutated: hard links
    (copy / "index.json").unlink()
    index = _valid_index(layout)
    if how == "replace":
        index = value
    elif how == "field":
        index[key] = value
    else:
        index["manifests"][0][key] = value
    (copy / "index.json").write_text(json.dumps(index))
    # index.json is not signed: an edit may pass, but only ever as the very same bundle
    assert _verified_digest(copy) in (None, pristine.digest)


def test_index_with_manifests_not_a_list_is_an_error_not_a_crash(
    pristine: Pristine, tmp_path: Path
) -> None:
    """Issue 11 #7: `"manifests": 5` was a 500 on the server; on a device it must be an error."""
    layout = pristine.layout
    copy = tmp_path / "bundle"
    shutil.copytree(layout, copy)
    index = _valid_index(layout)
    index["manifests"] = 5
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(SlmopsError):
        OciLayout(copy).read_index()
