"""The tarball form of a bundle, for air-gapped transfer: deterministic to write, safe to read.

A tar from a USB stick is hostile until proven otherwise. Python's `tarfile.extract` follows
whatever the archive says (absolute paths, `..`, symlinks, device nodes), so nothing here calls
it: every member is checked against the only names an OCI layout may hold (`oci-layout`,
`index.json`, `blobs/`, `blobs/sha256/`, `blobs/sha256/<64 hex>`), links and special files are
refused, and regular files are copied by hand into a temp directory next to the target that is
renamed into place only when everything succeeded.

A tarball can also be read in place (`TarLayout`): `verify` and `inspect` read its manifests and
hash its blobs straight from the archive without extracting gigabytes first.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, cast

from slmops.bundle.layout import BLOBS_DIR, INDEX_FILE, LayoutReader, OciLayout
from slmops.bundle.media import MAX_BLOB_BYTES, MAX_MANIFEST_BYTES, OCI_LAYOUT_FILE
from slmops.core.atomic import atomic_directory, atomic_open
from slmops.core.digest import CHUNK
from slmops.core.errors import ResourceError, UserInputError

MAX_TAR_MEMBERS = 100_000  # a bundle holds tens of blobs; millions of headers are an attack
_TOP_FILES = frozenset({OCI_LAYOUT_FILE, INDEX_FILE})
_DIRS = frozenset({"", "blobs", BLOBS_DIR})
_BLOB_RE = re.compile(r"^blobs/sha256/[0-9a-f]{64}\Z")
_HINT = "this tar is not a bundle written by slmops (or was tampered with); do not use it"


class UnsafeArchiveError(UserInputError):
    """A tar member that could write outside the target, or that a bundle never contains."""


def _check_member(m: tarfile.TarInfo, seen: set[str], where: str) -> str | None:
    """Return the normalised name of a regular-file member, None for an allowed directory, or
    raise naming the member and what is wrong with it."""

    def bad(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"tar member {m.name!r} {why}", where=where, hint=_HINT)

    raw = m.name
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        raise bad("has an absolute path")
    if ".." in re.split(r"[/\\]", raw):
        raise bad("contains a '..' component (it would escape the target folder)")
    if m.issym():
        raise bad(f"is a symlink (to {m.linkname!r}); bundles hold regular files only")
    if m.islnk():
        raise bad(f"is a hardlink (to {m.linkname!r}); bundles hold regular files only")
    if m.ischr() or m.isblk() or m.isfifo():
        raise bad("is a device or FIFO; bundles hold regular files only")
    name = raw
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if name == ".":
        name = ""
    if m.isdir():
        if name not in _DIRS:
            raise bad("is an unexpected directory (allowed: blobs/, blobs/sha256/)")
        return None
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise bad(f"has unsupported type {m.type!r}; bundles hold regular files only")
    if name not in _TOP_FILES and not _BLOB_RE.match(name):
        raise bad("is not a name an OCI layout holds (oci-layout, index.json, blobs/sha256/<hex>)")
    if name in seen:
        raise bad("appears twice (a later copy could silently replace the first)")
    limit = MAX_MANIFEST_BYTES if name in _TOP_FILES else MAX_BLOB_BYTES
    if m.size > limit:
        raise bad(f"declares {m.size} bytes, over the {limit}-byte limit")
    seen.add(name)
    return name


def _open_tar(tar_path: Path) -> tarfile.TarFile:
    try:
        return tarfile.TarFile(tar_path, "r", copybufsize=CHUNK)  # "r": uncompressed only
    except FileNotFoundError:
        raise UserInputError("bundle tarball not found", where=tar_path) from None
    except (OSError, tarfile.TarError) as exc:
        raise UnsafeArchiveError(
            f"not an uncompressed tar archive: {exc}", where=tar_path, hint=_HINT
        ) from None


def _members(tf: tarfile.TarFile, where: str) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """Checked regular-file members, streamed in archive order."""
    seen: set[str] = set()
    try:
        for count, m in enumerate(tf, 1):
            if count > MAX_TAR_MEMBERS:
                raise UnsafeArchiveError(
                    f"more than {MAX_TAR_MEMBERS} members", where=where, hint=_HINT
                )
            name = _check_member(m, seen, where)
            if name is not None:
                yield name, m
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"corrupt tar archive: {exc}", where=where, hint=_HINT) from None
    _check_end(tf, where)


def _check_end(tf: tarfile.TarFile, where: str) -> None:
    """tarfile stops quietly when a file ends exactly between two members, so a tarball cut
    there would read as a shorter, complete archive: require the end-of-archive marker (two
    zero blocks) right after the last member."""
    fh = tf.fileobj
    assert fh is not None
    fh.seek(tf.offset)
    if fh.read(2 * tarfile.BLOCKSIZE) != tarfile.NUL * (2 * tarfile.BLOCKSIZE):
        raise UnsafeArchiveError(
            "tar archive ends without its end-of-archive marker (truncated?)",
            where=where,
            hint="the tarball is incomplete; copy it again",
        )


def safe_extract(tar_path: Path, dest_dir: Path) -> Path:
    """Extract a bundle tarball into `dest_dir` (which must not exist) or leave nothing at all."""
    if dest_dir.exists() or dest_dir.is_symlink():
        raise UserInputError(
            "target folder already exists", where=dest_dir, hint="extract into a new folder"
        )
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest_dir.parent).free
    total = 0
    with _open_tar(tar_path) as tf, atomic_directory(dest_dir) as tmp:
        (tmp / BLOBS_DIR).mkdir(parents=True)
        for name, m in _members(tf, str(tar_path)):
            total += m.size
            if total > free:
                raise ResourceError(
                    f"tar member {name!r} does not fit: the archive needs more than the "
                    f"{free} bytes free",
                    where=dest_dir,
                    hint="free disk space or extract elsewhere",
                )
            src = cast(BinaryIO, tf.extractfile(m))
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            with src as fin, os.fdopen(os.open(tmp / name, flags, 0o644), "wb") as fout:
                try:
                    copied = _copy(fin, fout, m.size)
                except tarfile.TarError:
                    copied = -1
            if copied != m.size:
                raise UnsafeArchiveError(
                    f"tar member {name!r} is truncated (fewer than its {m.size} bytes)",
                    where=tar_path,
                    hint="the tarball is incomplete; copy it again",
                )
    return dest_dir


def _copy(fin: BinaryIO, fout: BinaryIO, size: int) -> int:
    done = 0
    while done < size and (chunk := fin.read(min(CHUNK, size - done))):
        fout.write(chunk)
        done += len(chunk)
    return done


Entry = tuple[str, int, Callable[[], BinaryIO]]  # name, size, opener


def _write_entries(out_tar: Path, entries: list[Entry]) -> None:
    """Write a deterministic tar atomically: sorted names, mtime 0, root owner, fixed modes."""
    with (
        atomic_open(out_tar) as fh,
        tarfile.TarFile(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tf,
    ):
        for d in ("blobs", BLOBS_DIR):
            tf.addfile(_info(d + "/", 0, tarfile.DIRTYPE, 0o755))
        for name, size, opener in sorted(entries, key=lambda e: e[0]):
            with opener() as src:
                tf.addfile(_info(name, size, tarfile.REGTYPE, 0o644), src)


def _info(name: str, size: int, kind: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mode, ti.mtime = size, kind, mode, 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def write_tar(layout_dir: Path, out_tar: Path) -> Path:
    """Pack an OCI layout directory into `out_tar` (same bytes for the same layout)."""
    layout = OciLayout(layout_dir)
    names = [OCI_LAYOUT_FILE, INDEX_FILE]
    names += [
        f"{BLOBS_DIR}/{p.name}"
        for p in (layout_dir / BLOBS_DIR).iterdir()
        if _BLOB_RE.match(f"{BLOBS_DIR}/{p.name}")
    ]
    entries: list[Entry] = []
    for name in names:
        size = layout.file_size(name)
        if size is None:
            raise UserInputError(f"{name} is missing", where=layout_dir, hint="not an OCI layout")
        entries.append((name, size, partial(layout.open_file, name)))
    _write_entries(out_tar, entries)
    return out_tar


class TarLayout(LayoutReader):
    """Read a bundle tarball in place; members are checked as strictly as by `safe_extract`."""

    def __init__(self, tar_path: Path):
        self.path = Path(tar_path)
        self.where = str(tar_path)
        self._tf = _open_tar(self.path)
        try:
            self.members = dict(_members(self._tf, self.where))
        except BaseException:
            self._tf.close()
            raise

    def file_size(self, rel: str) -> int | None:
        m = self.members.get(rel)
        return None if m is None else m.size

    def open_file(self, rel: str) -> BinaryIO:
        return cast(BinaryIO, self._tf.extractfile(self.members[rel]))

    def close(self) -> None:
        self._tf.close()

    def __enter__(self) -> TarLayout:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def rewrite_tar(tar_path: Path, changes: Mapping[str, bytes | None]) -> None:
    """Atomically rewrite a bundle tarball with members added/replaced (bytes) or removed (None).

    Unchanged members are streamed from the old archive, so a signature costs no extraction.
    """
    with TarLayout(tar_path) as old:
        entries: list[Entry] = [
            (n, m.size, partial(old.open_file, n))
            for n, m in old.members.items()
            if n not in changes
        ]
        for name, data in changes.items():
            if data is not None:
                entries.append((name, len(data), partial(io.BytesIO, data)))
        _write_entries(tar_path, entries)


@contextlib.contextmanager
def open_bundle(path: Path) -> Iterator[LayoutReader]:
    """A reader over a bundle, whether a layout directory or a tarball."""
    path = Path(path)
    if path.is_dir():
        yield OciLayout(path)
    elif path.is_file():
        with TarLayout(path) as reader:
            yield reader
    else:
        raise UserInputError(
            "bundle not found",
            where=path,
            hint="pass a bundle directory (OCI layout) or a .tar written by `slmops bundle`",
        )
