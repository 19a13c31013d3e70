"""OCI image layout primitives: descriptors, manifests, indexes, and a content-addressed blob store.

Everything read here may come from an attacker (a downloaded bundle, a tar from a USB stick), so
the reading side never trusts a declared number: a digest must match `sha256:<64 hex>` before it
becomes a path, a declared size is compared with the caller's limit before a byte is read, and
the bytes read are checked against the declared size and digest. Reading is written once, over a
small `file_size`/`open_file` seam, for a layout directory here and for a tarball in tarball.py.

The writing side stores identical content once (the path is the digest), streams big files (or
hardlinks them, then hashes the link) and writes JSON in canonical form (sorted keys, compact) so
that rebuilding identical inputs yields identical digests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from slmops.bundle.media import (
    MAX_MANIFEST_BYTES,
    MT_INDEX,
    MT_MANIFEST,
    OCI_LAYOUT_FILE,
    OCI_LAYOUT_VERSION,
)
from slmops.core.atomic import TMP_PREFIX, write_bytes_atomic
from slmops.core.digest import CHUNK
from slmops.core.errors import CheckFailedError
from slmops.protocol.digest import DIGEST_RE as _WIRE_DIGEST_RE

INDEX_FILE = "index.json"
BLOBS_DIR = "blobs/sha256"
DIGEST_RE = _WIRE_DIGEST_RE  # one pattern for every digest (protocol/digest.py)
MAX_SMALL_FILE_BYTES = 4096  # the oci-layout file
EMPTY_JSON = b"{}"


class BundleFormatError(CheckFailedError):
    """A bundle is malformed or its content does not match what its manifests declare."""


def check_digest(digest: object, *, where: str = "bundle") -> str:
    """Return a well-formed digest or refuse it: a digest becomes a file path, so `../` is fatal."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise BundleFormatError(
            f"malformed digest {digest!r}: expected 'sha256:' and 64 lowercase hex digits",
            where=where,
            hint="the bundle was corrupted or crafted; fetch it again from a trusted source",
        )
    return digest


class _Oci(BaseModel):
    """OCI JSON objects are open (new fields appear in new spec versions): unknown keys are
    ignored, while every field slmops reads is validated."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    def to_oci(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def annotation(self, key: str) -> str | None:
        return (getattr(self, "annotations", None) or {}).get(key)


class Descriptor(_Oci):
    media_type: str = Field(alias="mediaType")
    digest: str
    size: StrictInt = Field(ge=0)
    annotations: dict[str, str] | None = None
    artifact_type: str | None = Field(None, alias="artifactType")
    platform: dict[str, Any] | None = None
    urls: list[str] | None = None
    data: str | None = None

    @field_validator("digest")
    @classmethod
    def _digest_well_formed(cls, v: str) -> str:
        if not DIGEST_RE.match(v):
            raise ValueError(f"malformed digest {v!r}: expected 'sha256:' and 64 lowercase hex")
        return v


class Manifest(_Oci):
    schema_version: Literal[2] = Field(2, alias="schemaVersion")
    media_type: str | None = Field(None, alias="mediaType")
    artifact_type: str | None = Field(None, alias="artifactType")
    config: Descriptor
    layers: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


class Index(_Oci):
    schema_version: Literal[2] = Field(2, alias="schemaVersion")
    media_type: str | None = Field(MT_INDEX, alias="mediaType")
    artifact_type: str | None = Field(None, alias="artifactType")
    manifests: list[Descriptor] = Field(default_factory=list)
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


M = TypeVar("M", bound=BaseModel)


def parse_model(cls: type[M], data: Any, *, where: str) -> M:
    """Validate JSON data into `cls`, turning pydantic errors into one readable sentence."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        raise BundleFormatError(
            f"not a valid {cls.__name__}: '{loc}': {err['msg']}{more}",
            where=where,
            hint="the bundle was corrupted or was not written by slmops",
        ) from None


def canonical_json(obj: Any) -> bytes:
    """One byte string per JSON value (sorted keys, no spaces): digests are reproducible."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def verify_stream(fh: BinaryIO, digest: str, size: int, *, what: str) -> None:
    """Hash exactly `size` bytes from `fh` in 1 MiB chunks (memory stays flat) and compare.

    Reads one byte more than declared, so a blob that grew is caught without reading it all.
    """
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    seen = 0
    while seen <= size:
        n = fh.readinto(view[: min(CHUNK, size + 1 - seen)])  # type: ignore[attr-defined]
        if not n:
            break
        h.update(view[:n])
        seen += n
    if seen != size:
        found = f"more than {size}" if seen > size else str(seen)
        raise BundleFormatError(
            f"size mismatch: {size} bytes declared, {found} found",
            where=what,
            hint="the blob was truncated or altered; fetch the bundle again",
        )
    actual = "sha256:" + h.hexdigest()
    if actual != digest:
        raise BundleFormatError(
            f"content does not match its digest: expected {digest}, got {actual}",
            where=what,
            hint="a byte was altered after the bundle was built; fetch it again from a trusted source",
        )


class LayoutReader:
    """Bounded, verified reads of an OCI layout; subclasses supply `file_size` and `open_file`."""

    where: str

    def file_size(self, rel: str) -> int | None:
        """Size of a regular file at `rel` (None if absent); refuse anything but a regular file."""
        raise NotImplementedError

    def open_file(self, rel: str) -> BinaryIO:
        raise NotImplementedError

    def blob_rel(self, digest: str) -> str:
        return f"{BLOBS_DIR}/{check_digest(digest, where=self.where).split(':', 1)[1]}"

    def blob_size(self, digest: str) -> int | None:
        return self.file_size(self.blob_rel(digest))

    def open_blob(self, digest: str) -> BinaryIO:
        return self.open_file(self.blob_rel(digest))

    def read_file(self, rel: str, max_bytes: int) -> bytes:
        size = self.file_size(rel)
        if size is None:
            raise BundleFormatError(
                f"{rel} is missing", where=self.where, hint="this is not a complete OCI layout"
            )
        if size > max_bytes:
            raise BundleFormatError(
                f"{rel} is {size} bytes, more than the {max_bytes}-byte limit", where=self.where
            )
        with self.open_file(rel) as fh:
            return fh.read(max_bytes)

    def check_blob_present(self, desc: Descriptor, *, what: str) -> None:
        """Cheap check before hashing: the blob exists and has the declared size."""
        actual = self.blob_size(desc.digest)
        if actual is None:
            raise BundleFormatError(
                f"blob {desc.digest} is missing",
                where=f"{self.where}: {what}",
                hint="the bundle is incomplete; fetch or pull it again",
            )
        if actual != desc.size:
            raise BundleFormatError(
                f"blob {desc.digest} is {actual} bytes, but {desc.size} are declared",
                where=f"{self.where}: {what}",
                hint="the blob was truncated or altered; fetch the bundle again",
            )

    def read_blob(self, desc: Descriptor, max_bytes: int, *, what: str) -> bytes:
        """Read a small blob: the declared size is checked against `max_bytes` before reading."""
        if desc.size > max_bytes:
            raise BundleFormatError(
                f"declared size {desc.size} bytes is over the {max_bytes}-byte limit for this "
                f"kind of blob ({desc.media_type})",
                where=f"{self.where}: {what}",
                hint="refusing to read it: the bundle was corrupted or crafted",
            )
        self.check_blob_present(desc, what=what)
        with self.open_blob(desc.digest) as fh:
            data = fh.read(desc.size + 1)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if len(data) != desc.size or actual != desc.digest:
            raise BundleFormatError(
                f"blob does not match its descriptor: expected {desc.digest} ({desc.size} bytes), "
                f"got {actual} ({len(data)} bytes)",
                where=f"{self.where}: {what}",
                hint="a byte was altered after the bundle was built; fetch it again",
            )
        return data

    def read_json(self, desc: Descriptor, max_bytes: int, *, what: str) -> Any:
        data = self.read_blob(desc, max_bytes, what=what)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleFormatError(
                f"blob {desc.digest} is not valid JSON: {exc}", where=f"{self.where}: {what}"
            ) from None

    def verify_blob(self, desc: Descriptor, *, what: str) -> None:
        self.check_blob_present(desc, what=what)
        with self.open_blob(desc.digest) as fh:
            verify_stream(fh, desc.digest, desc.size, what=f"{self.where}: {what}")

    def read_layout_version(self) -> str:
        raw = self.read_file(OCI_LAYOUT_FILE, MAX_SMALL_FILE_BYTES)
        try:
            version = json.loads(raw).get("imageLayoutVersion")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            version = None
        if version != OCI_LAYOUT_VERSION:
            raise BundleFormatError(
                f"{OCI_LAYOUT_FILE} does not declare imageLayoutVersion {OCI_LAYOUT_VERSION!r}",
                where=self.where,
                hint="this is not an OCI image layout written by slmops",
            )
        return OCI_LAYOUT_VERSION

    def read_index(self) -> Index:
        raw = self.read_file(INDEX_FILE, MAX_MANIFEST_BYTES)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleFormatError(
                f"{INDEX_FILE} is not valid JSON: {exc}", where=self.where
            ) from None
        return parse_model(Index, data, where=f"{self.where}: {INDEX_FILE}")

    def reachable(self, roots: list[Descriptor] | None = None) -> set[str]:
        """Digests reachable from `roots` (default: index.json) through indexes and manifests."""
        seen: set[str] = set()
        todo = list(self.read_index().manifests if roots is None else roots)
        while todo:
            desc = todo.pop()
            if desc.digest in seen:
                continue
            seen.add(desc.digest)
            if desc.media_type == MT_INDEX:
                data = self.read_json(desc, MAX_MANIFEST_BYTES, what=desc.digest)
                todo.extend(parse_model(Index, data, where=desc.digest).manifests)
            elif desc.media_type == MT_MANIFEST:
                data = self.read_json(desc, MAX_MANIFEST_BYTES, what=desc.digest)
                m = parse_model(Manifest, data, where=desc.digest)
                seen.update(d.digest for d in [m.config, *m.layers])
        return seen


class OciLayout(LayoutReader):
    """An OCI image layout directory: read (bounded, verified) and write (content-addressed)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.where = str(self.root)

    @classmethod
    def init(cls, root: Path) -> OciLayout:
        """Create an empty layout in a new or empty directory."""
        root.mkdir(parents=True, exist_ok=True)
        (root / BLOBS_DIR).mkdir(parents=True, exist_ok=True)
        layout = cls(root)
        write_bytes_atomic(
            root / OCI_LAYOUT_FILE, canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})
        )
        layout.write_index(Index())
        return layout

    # reading seam ---------------------------------------------------------------------------
    def file_size(self, rel: str) -> int | None:
        try:
            st = os.lstat(self.root / rel)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise BundleFormatError(
                f"{rel} is not a regular file (a symlink, directory or device)",
                where=self.where,
                hint="a bundle holds regular files only; the layout was tampered with",
            )
        return st.st_size

    def open_file(self, rel: str) -> BinaryIO:
        # O_NOFOLLOW and O_NONBLOCK: a blob swapped for a symlink or a FIFO is refused, not read.
        fd = os.open(self.root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BundleFormatError(f"{rel} is not a regular file", where=self.where)
        return os.fdopen(fd, "rb")

    def blob_path(self, digest: str) -> Path:
        return self.root / self.blob_rel(digest)

    # writing --------------------------------------------------------------------------------
    def put_blob_bytes(
        self,
        data: bytes,
        media_type: str,
        *,
        annotations: dict[str, str] | None = None,
        artifact_type: str | None = None,
    ) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            write_bytes_atomic(path, data)
        return Descriptor(
            media_type=media_type,
            digest=digest,
            size=len(data),
            annotations=annotations or None,
            artifact_type=artifact_type,
        )

    def put_json(self, obj: Any, media_type: str, **kw: Any) -> Descriptor:
        return self.put_blob_bytes(canonical_json(obj), media_type, **kw)

    def put_file(
        self,
        src: Path,
        media_type: str,
        *,
        annotations: dict[str, str] | None = None,
        link: bool = True,
    ) -> Descriptor:
        """Store a file as a blob. A hardlink costs no copy; the linked inode is hashed, so what
        is stored is exactly what the digest names even if `src` was replaced meanwhile."""
        blobs = self.root / BLOBS_DIR
        tmp = blobs / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        linked = False
        if link:
            with contextlib.suppress(OSError):
                os.link(src, tmp)
                linked = True
        try:
            if linked:
                with tmp.open("rb") as fh:
                    digest, size = _hash_copy(fh, None)
            else:
                with src.open("rb") as fh, tmp.open("wb") as out:
                    digest, size = _hash_copy(fh, out)
                    out.flush()
                    os.fsync(out.fileno())
            final = self.blob_path(digest)
            if final.exists():
                tmp.unlink()
            else:
                os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return Descriptor(
            media_type=media_type, digest=digest, size=size, annotations=annotations or None
        )

    def write_index(self, index: Index) -> None:
        write_bytes_atomic(self.root / INDEX_FILE, canonical_json(index.to_oci()))


def _hash_copy(fh: BinaryIO, out: BinaryIO | None) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := fh.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
        if out is not None:
            out.write(chunk)
    return "sha256:" + h.hexdigest(), size
