import os
from pathlib import Path

import pytest

from slmops.core import atomic
from slmops.core.atomic import (
    TMP_PREFIX,
    atomic_directory,
    clean_stale_temps,
    ensure_free_space,
    write_json_atomic,
)
from slmops.core.digest import tree_digest
from slmops.core.errors import ResourceError


def test_failed_directory_write_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed midway")
    assert not final.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_replace_swaps_only_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(final, replace=True) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError
    assert (final / "v").read_text() == "1"
    with atomic_directory(final, replace=True) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2"
    assert oct(final.stat().st_mode & 0o777) == oct(0o755)


def test_existing_directory_is_refused_without_replace(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError), atomic_directory(tmp_path / "out"):
        pass


def test_json_write_and_stale_temp_cleanup(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a.json", {"k": 1})
    assert (tmp_path / "a.json").read_text().strip().startswith("{")
    (tmp_path / f"{TMP_PREFIX}left").mkdir()
    assert clean_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_free_space_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_free_space(tmp_path, 1, what="test")
    with pytest.raises(ResourceError, match="not enough disk space"):
        ensure_free_space(tmp_path / "not" / "yet", 1 << 62, what="test")

    # A disk that fills up while writing (ENOSPC) becomes a clean ResourceError, not a traceback.
    def full(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "fsync_tree", full)
    with pytest.raises(ResourceError, match="no space left"), atomic_directory(tmp_path / "x"):
        pass
    assert not (tmp_path / "x").exists()


def test_tree_digest_tracks_content_and_names(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    d1 = tree_digest(tmp_path)
    (tmp_path / "slmops-card.json").write_text("{}")
    assert tree_digest(tmp_path) == d1, "the card is metadata, not content"
    (tmp_path / "a").write_text("2")
    d2 = tree_digest(tmp_path)
    assert d2 != d1
    os.rename(tmp_path / "a", tmp_path / "b")
    assert tree_digest(tmp_path) != d2
