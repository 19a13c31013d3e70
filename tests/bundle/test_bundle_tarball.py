"""The tar form: deterministic writing, and hostile archives rejected with nothing left behind.

Every hostile archive is aimed at a sentinel file outside the target folder; after the refusal
the sentinel is unchanged, the target does not exist, and no temp folder is left next to it.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from factories.bundles import build, no_temp_left
from slmops.bundle import tarball
from slmops.bundle.tarball import UnsafeArchiveError, safe_extract, write_tar
from slmops.bundle.verify import BundleVerificationError, verify_bundle
from slmops.core.errors import ResourceError, UserInputError

HEX = "a" * 64
Member = Callable[[tarfile.TarFile], None]


def _file(name: str, data: bytes = b"x", size: int | None = None) -> Member:
    def add(tf: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data) if size is None else size
        tf.addfile(ti, io.BytesIO(data) if size is None else None)

    return add


def _special(name: str, kind: bytes, linkname: str = "") -> Member:
    def add(tf: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname = kind, linkname
        tf.addfile(ti)

    return add


def make_tar(path: Path, *members: Member) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')(tf)
        for add in members:
            add(tf)
    return path


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(work folder holding the target, target, sentinel outside the target)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    sentinel = outside / "sentinel"
    sentinel.write_text("original")
    work = tmp_path / "work"
    work.mkdir()
    return work, work / "dest", sentinel


HOSTILE = {
    "dotdot": ([_file("../outside/sentinel", b"pwned")], "contains a '..' component"),
    "dotdot-deep": ([_file("blobs/sha256/../../../outside/sentinel", b"pwned")], "'..'"),
    "absolute": ([_file("/tmp/slmops-test-abs-member", b"pwned")], "has an absolute path"),
    "symlink": (
        [_special(f"blobs/sha256/{HEX}", tarfile.SYMTYPE, "../../../outside/sentinel")],
        "is a symlink (to '../../../outside/sentinel')",
    ),
    "symlink-then-write": (
        [_special("blobs", tarfile.SYMTYPE, "../outside"), _file("blobs/sentinel", b"pwned")],
        "is a symlink",
    ),
    "hardlink": (
        [_special(f"blobs/sha256/{HEX}", tarfile.LNKTYPE, "../outside/sentinel")],
        "is a hardlink",
    ),
    "fifo": ([_special(f"blobs/sha256/{HEX}", tarfile.FIFOTYPE)], "is a device or FIFO"),
    "chardev": ([_special("index.json", tarfile.CHRTYPE)], "is a device or FIFO"),
    "unexpected-name": ([_file("run-me.sh", b"#!/bin/sh")], "is not a name an OCI layout holds"),
    "bad-blob-name": ([_file("blobs/sha256/NOTHEX", b"x")], "is not a name an OCI layout holds"),
    "unexpected-dir": ([_special("etc", tarfile.DIRTYPE)], "is an unexpected directory"),
    "duplicate": (
        [_file("index.json", b"{}"), _file("./index.json", b"{}")],
        "appears twice",
    ),
    "oversize": ([_file(f"blobs/sha256/{HEX}", size=(64 << 30) + 1)], "over the"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_is_rejected_and_nothing_is_left(
    case: str, scene: tuple[Path, Path, Path]
) -> None:
    work, dest, sentinel = scene
    members, why = HOSTILE[case]
    tar = make_tar(work.parent / f"{case}.tar", *members)
    with pytest.raises(UnsafeArchiveError) as exc:
        safe_extract(tar, dest)
    assert isinstance(exc.value, UserInputError) and exc.value.exit_code == 2
    assert why in str(exc.value) and "tar member" in str(exc.value)
    assert sentinel.read_text() == "original"
    assert not Path("/tmp/slmops-test-abs-member").exists()
    assert not dest.exists() and no_temp_left(work)
    with pytest.raises(BundleVerificationError, match="tar member"):
        verify_bundle(tar, [], require_signature=False)


def test_round_trip_write_then_extract_then_verify(tmp_path: Path) -> None:
    layout = build(tmp_path)
    tar = write_tar(layout, tmp_path / "b.tar")
    with tarfile.open(tar) as tf:
        infos = tf.getmembers()
    names = [m.name for m in infos]
    assert names[:2] == ["blobs/", "blobs/sha256/"] or names[:2] == ["blobs", "blobs/sha256"]
    assert names[2:] == sorted(names[2:])
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in infos)
    assert {m.mode for m in infos if m.isfile()} == {0o644}
    assert {m.mode for m in infos if m.isdir()} == {0o755}
    out = safe_extract(tar, tmp_path / "x" / "extracted")
    a = verify_bundle(out, [], require_signature=False)
    assert a == verify_bundle(layout, [], require_signature=False)
    assert write_tar(out, tmp_path / "c.tar").read_bytes() == tar.read_bytes()


def test_existing_target_is_refused(tmp_path: Path) -> None:
    tar = build(tmp_path, tmp_path / "b.tar", format="tar")
    (tmp_path / "dest").mkdir()
    with pytest.raises(UserInputError, match="already exists"):
        safe_extract(tar, tmp_path / "dest")


def test_not_enough_disk_is_refused_naming_the_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tar = build(tmp_path, tmp_path / "b.tar", format="tar")

    class Usage:
        total = used = 0
        free = 100  # bytes

    monkeypatch.setattr(tarball.shutil, "disk_usage", lambda p: Usage())
    with pytest.raises(ResourceError, match="does not fit") as exc:
        safe_extract(tar, tmp_path / "dest")
    assert "tar member 'blobs/sha256/" in str(exc.value) and exc.value.exit_code == 2
    assert not (tmp_path / "dest").exists() and no_temp_left(tmp_path)


def test_truncated_and_non_tar_files(tmp_path: Path) -> None:
    tar = build(tmp_path, tmp_path / "b.tar", format="tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(UserInputError):
        safe_extract(cut, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and no_temp_left(tmp_path)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(UnsafeArchiveError, match="not an uncompressed tar"):
        safe_extract(junk, tmp_path / "dest")
    with pytest.raises(BundleVerificationError):
        verify_bundle(cut, [], require_signature=False)


def test_a_tarball_cut_between_two_members_is_refused(tmp_path: Path) -> None:
    """tarfile reads a file that ends exactly at a member boundary as a shorter, complete
    archive; the missing end-of-archive marker gives the truncation away."""
    import tarfile

    tar = build(tmp_path, tmp_path / "b.tar", format="tar")
    with tarfile.open(tar) as tf:
        boundary = tf.getmembers()[-1].offset  # where the last member's header starts
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[:boundary])
    with pytest.raises(UserInputError, match="end-of-archive marker"):
        safe_extract(cut, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and no_temp_left(tmp_path)
