"""Content-addressed storage for the registry: blobs, upload sessions and manifests on disk.

    DATA/blobs/sha256/<hex>        every blob and every manifest, named by its digest
    DATA/manifests/sha256/<hex>    marker: this digest is a manifest; holds its media type
    DATA/uploads/<uuid>            an upload in progress (chunks appended in order)

A blob appears under its digest only after its bytes were hashed and matched (write to a temp
name or an upload file, fsync, rename), so a reader never sees partial content and a digest
file is always right. Content is stored once whatever the number of repositories or versions
naming it: a finished upload whose digest is already stored is discarded, not rewritten. The
store is global rather than per repository; any authorised reader may fetch a digest it knows.

Everything here is blocking file I/O, called from worker threads by the API; memory per call
stays about one PIECE whatever the blob size.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from slmops.bundle.media import MAX_BLOB_BYTES
from slmops.bundle.oci_ref import DIGEST_RE
from slmops.core.atomic import write_bytes_atomic

PIECE = 1 << 20
UPLOAD_MAX_AGE_S = 24 * 3600  # abandoned upload sessions are removed after this long
_UUID_RE = re.compile(r"^[0-9a-f]{32}\Z")


class StoreError(Exception):
    """A request the store cannot satisfy; ``code`` is the OCI error code to answer with."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class BlobStore:
    """The registry's disk layout under one data directory (see the module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.blobs = data_dir / "blobs" / "sha256"
        self.manifests = data_dir / "manifests" / "sha256"
        self.uploads = data_dir / "uploads"
        for folder in (self.blobs, self.manifests, self.uploads):
            folder.mkdir(parents=True, exist_ok=True)

    # --- blobs -------------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        """The file of a digest; the digest is validated first, so it can never escape."""
        if not DIGEST_RE.match(digest):
            raise StoreError("DIGEST_INVALID", f"invalid digest {digest!r}")
        return self.blobs / digest.split(":", 1)[1]

    def size(self, digest: str) -> int | None:
        """Size of a stored blob, None when absent."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def read_range(self, digest: str, start: int, length: int) -> Iterator[bytes]:
        """Yield ``length`` bytes from ``start`` in pieces (constant memory)."""
        with self.path(digest).open("rb") as fh:
            fh.seek(start)
            while length > 0 and (piece := fh.read(min(PIECE, length))):
                length -= len(piece)
                yield piece

    def read_small(self, digest: str, limit: int) -> bytes:
        """A whole blob known to be small (manifests, configs); refuses more than ``limit``."""
        size = self.size(digest)
        if size is None:
            raise StoreError("BLOB_UNKNOWN", f"blob {digest} is not stored", 404)
        if size > limit:
            raise StoreError("SIZE_INVALID", f"blob {digest} is over {limit} bytes")
        return self.path(digest).read_bytes()

    # --- manifests ---------------------------------------------------------------------------

    def put_manifest(self, data: bytes, media_type: str) -> str:
        """Store manifest bytes exactly as sent (their digest is over these bytes)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if not path.is_file():
            write_bytes_atomic(path, data)
        marker = self.manifests / path.name
        if not marker.is_file():
            write_bytes_atomic(marker, media_type.encode())
        return digest

    def manifest_type(self, digest: str) -> str | None:
        """The media type of a stored manifest; None when ``digest`` is no manifest here."""
        if not DIGEST_RE.match(digest):
            return None
        try:
            return (self.manifests / digest.split(":", 1)[1]).read_text()
        except FileNotFoundError:
            return None

    # --- uploads -----------------------------------------------------------------------------

    def start_upload(self) -> str:
        """A new, empty upload session; stale sessions are swept at the same time."""
        cutoff = time.time() - UPLOAD_MAX_AGE_S
        for old in self.uploads.iterdir():
            with contextlib.suppress(OSError):
                if old.stat().st_mtime < cutoff:
                    old.unlink()
        upload_id = uuid.uuid4().hex
        (self.uploads / upload_id).touch()
        return upload_id

    def upload_path(self, upload_id: str) -> Path:
        path = self.uploads / upload_id
        if not _UUID_RE.match(upload_id) or not path.is_file():
            raise StoreError("BLOB_UPLOAD_UNKNOWN", f"no upload session {upload_id!r}", 404)
        return path

    def upload_size(self, upload_id: str) -> int:
        return self.upload_path(upload_id).stat().st_size

    def append(self, upload_id: str, piece: bytes) -> int:
        """Append one piece to a session; returns the new size. Refuses oversized blobs."""
        path = self.upload_path(upload_id)
        with path.open("ab") as fh:
            if fh.tell() + len(piece) > MAX_BLOB_BYTES:
                raise StoreError("SIZE_INVALID", f"blob over {MAX_BLOB_BYTES} bytes refused")
            fh.write(piece)
            return fh.tell()

    def finish(self, upload_id: str, digest: str) -> int:
        """Verify the session's content against ``digest`` and move it into the store.

        The content is hashed from disk (hash state cannot survive between requests or across
        API processes). An already stored digest keeps its file: dedup, nothing rewritten.
        """
        path, target = self.upload_path(upload_id), self.path(digest)
        hasher = hashlib.sha256()
        with path.open("rb") as fh:
            while piece := fh.read(PIECE):
                hasher.update(piece)
            os.fsync(fh.fileno())
        size = path.stat().st_size
        if "sha256:" + hasher.hexdigest() != digest:
            path.unlink()
            raise StoreError(
                "DIGEST_INVALID", f"content ({size} bytes) does not match digest {digest}"
            )
        if target.is_file():
            path.unlink()
        else:
            os.replace(path, target)
        return size

    def cancel(self, upload_id: str) -> None:
        self.upload_path(upload_id).unlink()

    def count_blobs(self) -> int:
        return sum(1 for p in self.blobs.iterdir() if not p.name.startswith("."))
