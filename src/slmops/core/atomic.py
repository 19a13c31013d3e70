"""Atomic writes: nothing half-written is ever visible under its final name.

Files are written to a temp name in the same directory, fsynced and renamed. Directories are
built under a temp name and renamed into place only when complete, so a killed process leaves
at most a `.slmops-tmp-*` directory that readers ignore and the next run removes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from slmops.core.errors import ResourceError

TMP_PREFIX = ".slmops-tmp-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at `path` only once complete (fsync + rename).

    On any exception the temp file is removed and `path` keeps its old content (or stays absent).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    os.fchmod(fd, mode)  # mkstemp makes 0600; secrets use their own writer
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise ResourceError(
                "no space left on device", where=path, hint="free disk space"
            ) from None
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        _fsync_dir(d)


@contextlib.contextmanager
def atomic_directory(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory next to `final`; on success rename it to `final`.

    On any exception the temp directory is removed, so `final` either does not exist or is
    complete. With replace=True an existing `final` is swapped out only after the new one is
    fully written.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + "-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a published model folder is world-readable
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            old = final.with_name(TMP_PREFIX + final.name + "-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise ResourceError(
                "no space left on device", where=final, hint="free disk space"
            ) from None
        raise


def clean_stale_temps(parent: Path) -> int:
    """Remove temp directories left by killed runs; returns how many were removed."""
    if not parent.is_dir():
        return 0
    removed = 0
    for p in parent.iterdir():
        if p.name.startswith(TMP_PREFIX):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hardlink every file of src into dst (same filesystem), copying where links fail."""
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        target = dst / rel
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target)
        except OSError:
            shutil.copy2(p, target)


def ensure_free_space(path: Path, needed: int, *, what: str) -> None:
    """Refuse early (exit 2) when the disk cannot hold `needed` bytes, instead of failing midway."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ResourceError(
            f"not enough disk space for {what}: need about {needed / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB free",
            where=probe,
            hint="free disk space or choose another --out directory",
        )
