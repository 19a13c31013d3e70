"""Fetch one variant of a bundle (manifests, config, layers, signatures) into a staging folder.

`BlobSource` is the narrow seam: a local bundle folder (`LayoutSource`: sneakernet, tests) or an
OCI registry (`RegistrySource`, over the agent's one transport, transport.py). Blobs land in
``STAGING/blobs/<hex>.part`` and are hashed while they stream; only a blob whose size and
digest matched gets its final name, so a restart resumes a ``.part`` (HTTP Range for a registry) and trusts nothing half-written. The staging folder is
kept across restarts on purpose: it is what makes resume possible.

Nothing here decides trust: verify_variant.py checks what was fetched against the signature.
Disk full raises ResourceError; bytes that do not match their descriptor raise CheckFailedError.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from slmops.agent import crash_point
from slmops.agent.oci_client import OciClient
from slmops.agent.verify_variant import VariantCheckError, sha256_hex
from slmops.bundle.layout import (
    BundleFormatError,
    Descriptor,
    Index,
    Manifest,
    OciLayout,
    canonical_json,
    check_digest,
    parse_model,
)
from slmops.bundle.media import (
    ANN_REF_NAME,
    ANN_VARIANT,
    ARTIFACT_SIGNATURE,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MT_INDEX,
)
from slmops.bundle.oci_ref import referrers_tag
from slmops.bundle.signing import MAX_SIGNATURE_BYTES
from slmops.core.errors import ResourceError, UserInputError
from slmops.core.safepath import safe_join

PIECE = 1 << 20
MAX_SIGNATURES = 16  # more signatures than this under one tag are ignored (untrusted input)


@dataclass
class FetchStats:
    blobs: int = 0  # blobs transferred (not already complete in staging)
    bytes: int = 0  # bytes transferred in this run
    resumed: int = 0  # bytes found in .part files and not transferred again


class BlobSource(Protocol):
    def get_manifest(self, digest_or_tag: str) -> bytes:
        """Manifest or index bytes; when asked by digest, the bytes hash to it."""
        ...

    def get_referrers_tag(self, tag: str) -> bytes | None:
        """What is stored under a `sha256-<hex>` referrers tag (signatures), None if nothing."""
        ...

    def fetch_blob(self, desc: Descriptor, dest: Path, *, resume: bool = True) -> FetchStats:
        """Write the blob to `dest` (via `dest.part`, resumed), checked against `desc`."""
        ...


@dataclass
class FetchedVariant:
    bundle_digest: str
    bundle_index: bytes
    manifest_digest: str
    manifest: bytes
    config: bytes
    signatures: list[tuple[bytes, bytes]]  # (signature manifest, signature layer)
    files: dict[str, Path] = field(default_factory=dict)  # layer digest -> staged file
    stats: FetchStats = field(default_factory=FetchStats)


def _enospc(where: Path) -> ResourceError:
    return ResourceError("no space left on device", where=where, hint="free disk space")


@contextlib.contextmanager
def _disk_errors(where: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _enospc(where) from None
        raise


def _resume_part(part: Path, size: int, resume: bool) -> tuple[int, hashlib._Hash]:
    """Bytes already in `part` (kept only if no longer than the blob) and their running hash."""
    h = hashlib.sha256()
    have = part.stat().st_size if resume and part.is_file() else 0
    if have > size:
        have = 0
    with contextlib.suppress(FileNotFoundError), part.open("rb") as fh:
        left = have
        while left and (chunk := fh.read(min(PIECE, left))):
            h.update(chunk)
            left -= len(chunk)
    return have, h


CRASH_SPLIT_BYTES = 64 * 1024


def _write_stream(
    pieces: Iterator[bytes], desc: Descriptor, dest: Path, have: int, h: hashlib._Hash
) -> int:
    """Append `pieces` to dest.part, check size and digest, then rename; bytes written."""
    part = dest.with_name(dest.name + ".part")
    written = 0
    with _disk_errors(dest), part.open("ab" if have else "wb") as fh:
        for piece in pieces:
            if have + written + len(piece) > desc.size:
                raise VariantCheckError(f"blob longer than {desc.size} bytes", where=desc.digest)
            first = written == 0 and have == 0
            if first and len(piece) == desc.size >= CRASH_SPLIT_BYTES:
                # a weights blob in one piece: write half durably first, so the crash seam
                # still lands mid-blob (metadata blobs are smaller and pass straight through)
                half = len(piece) // 2
                fh.write(piece[:half])
                fh.flush()
                os.fsync(fh.fileno())
                crash_point("download-mid")
                fh.write(piece[half:])
            else:
                fh.write(piece)
            h.update(piece)
            written += len(piece)
            if first and have + written < desc.size:
                fh.flush()
                os.fsync(fh.fileno())
                crash_point("download-mid")
        fh.flush()
        os.fsync(fh.fileno())
    if have + written != desc.size or "sha256:" + h.hexdigest() != desc.digest:
        part.unlink(missing_ok=True)
        raise VariantCheckError(
            "downloaded blob does not match its size or digest",
            where=desc.digest,
            hint="the source holds damaged or tampered content; do not deploy it",
        )
    os.replace(part, dest)
    return written


class LayoutSource:
    """A bundle folder (OCI image layout) on local disk or removable media."""

    def __init__(self, path: Path, *, piece: int = PIECE) -> None:
        self.layout = OciLayout(Path(path))
        self.piece = piece

    def get_manifest(self, digest_or_tag: str) -> bytes:
        digest = digest_or_tag
        if not digest.startswith("sha256:"):
            hits = [
                d
                for d in self.layout.read_index().manifests
                if d.annotation(ANN_REF_NAME) == digest_or_tag and d.media_type == MT_INDEX
            ]
            if not hits:
                raise UserInputError(f"no bundle tagged {digest_or_tag!r}", where=self.layout.where)
            digest = hits[0].digest
        check_digest(digest, where=self.layout.where)
        size = self.layout.blob_size(digest)
        if size is None or size > MAX_MANIFEST_BYTES:
            raise VariantCheckError(
                f"manifest {digest} missing or too big", where=self.layout.where
            )
        with self.layout.open_blob(digest) as fh:
            data = fh.read(MAX_MANIFEST_BYTES)
        if sha256_hex(data) != digest:
            raise VariantCheckError(f"manifest does not match {digest}", where=self.layout.where)
        return data

    def get_referrers_tag(self, tag: str) -> bytes | None:
        """Synthesise the referrers index: signature manifests in index.json naming `tag`'s digest."""
        subject = "sha256:" + tag.removeprefix("sha256-")
        found: list[Descriptor] = []
        for d in self.layout.read_index().manifests:
            if d.artifact_type == ARTIFACT_SIGNATURE:
                m = _parse_manifest(self.get_manifest(d.digest), d.digest)
                if m.subject is not None and m.subject.digest == subject:
                    found.append(d)
        if not found:
            return None
        return canonical_json(Index(manifests=found).to_oci())

    def fetch_blob(self, desc: Descriptor, dest: Path, *, resume: bool = True) -> FetchStats:
        if dest.is_file() and dest.stat().st_size == desc.size:
            return FetchStats()
        have, h = _resume_part(dest.with_name(dest.name + ".part"), desc.size, resume)
        src = self.layout.blob_path(check_digest(desc.digest))

        def pieces(fh: BinaryIO) -> Iterator[bytes]:
            fh.seek(have)
            while chunk := fh.read(self.piece):
                yield chunk

        try:
            with self.layout.open_blob(desc.digest) as fh:
                written = _write_stream(pieces(fh), desc, dest, have, h)
        except FileNotFoundError:
            raise VariantCheckError("blob missing from the bundle folder", where=src) from None
        return FetchStats(1, written, have)


class RegistrySource(OciClient):
    """One repository on an OCI registry (`HOST:PORT`); http only for loopback or when allowed.

    The `OciClient` (its constructor: base, repository, allow_http, timeout, token, transport)
    with the `BlobSource` methods on top; tests pass a FakeTransport."""

    def get_manifest(self, digest_or_tag: str) -> bytes:
        expect = digest_or_tag if digest_or_tag.startswith("sha256:") else None
        got = self.manifest(digest_or_tag, expect)
        if got is None:
            raise UserInputError(f"no bundle tagged {digest_or_tag!r}", where=self.where)
        return got

    def get_referrers_tag(self, tag: str) -> bytes | None:
        return self.manifest(tag)

    def fetch_blob(self, desc: Descriptor, dest: Path, *, resume: bool = True) -> FetchStats:
        if dest.is_file() and dest.stat().st_size == desc.size:
            return FetchStats()
        have, h = _resume_part(dest.with_name(dest.name + ".part"), desc.size, resume)
        if have == desc.size:  # complete but not renamed (killed just before): check it
            return FetchStats(0, _write_stream(iter(()), desc, dest, have, h), have)
        with self.blob(check_digest(desc.digest), have) as resp:
            if resp.status != 206:  # the registry ignored the Range: start over
                have, h = 0, hashlib.sha256()
            written = _write_stream(resp.iter_bytes(), desc, dest, have, h)
        return FetchStats(1, written, have)


def _parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        return parse_model(Manifest, json.loads(data), where=where)
    except (ValueError, BundleFormatError) as exc:
        raise VariantCheckError(f"not a valid manifest: {exc}", where=where) from None


def _blob_path(blobs: Path, digest: str) -> Path:
    """Where a blob is staged: its hex under `blobs`, the digest checked and the path kept inside."""
    return safe_join(blobs, check_digest(digest, where="staging").split(":", 1)[1])


def _small_blob(source: BlobSource, desc: Descriptor, blobs: Path, limit: int) -> bytes:
    if desc.size > limit:
        raise VariantCheckError(f"blob declared {desc.size} bytes, over {limit}", where=desc.digest)
    dest = _blob_path(blobs, desc.digest)
    source.fetch_blob(desc, dest)
    return dest.read_bytes()


def fetch_metadata(
    source: BlobSource, bundle_ref: str, variant: str, staging_dir: Path
) -> FetchedVariant:
    """Bundle index, one variant manifest (by name or digest), its config and the signatures."""
    blobs = safe_join(staging_dir, "blobs")
    with _disk_errors(staging_dir):
        blobs.mkdir(parents=True, exist_ok=True)
    index_bytes = source.get_manifest(bundle_ref)
    bundle_digest = sha256_hex(index_bytes)
    if bundle_ref.startswith("sha256:") and bundle_digest != bundle_ref:
        raise VariantCheckError(f"bundle index hashes to {bundle_digest}", where=bundle_ref)
    try:
        index = parse_model(Index, json.loads(index_bytes), where=bundle_digest)
    except (ValueError, BundleFormatError) as exc:
        raise VariantCheckError(f"not a valid bundle index: {exc}", where=bundle_digest) from None
    entry = next(
        (d for d in index.manifests if variant in (d.digest, d.annotation(ANN_VARIANT))), None
    )
    if entry is None:
        raise VariantCheckError(f"bundle has no variant {variant!r}", where=bundle_digest)
    manifest = source.get_manifest(entry.digest)
    m = _parse_manifest(manifest, entry.digest)
    config = _small_blob(source, m.config, blobs, MAX_CONFIG_BYTES)
    signatures: list[tuple[bytes, bytes]] = []
    tagged = source.get_referrers_tag(referrers_tag(bundle_digest))
    if tagged is not None:
        try:
            obj = json.loads(tagged)
        except ValueError:
            raise VariantCheckError("referrers tag holds no JSON", where=bundle_digest) from None
        children = (
            parse_model(Index, obj, where="referrers").manifests[:MAX_SIGNATURES]
            if isinstance(obj, dict) and obj.get("mediaType") == MT_INDEX
            else None
        )
        raws = [tagged] if children is None else [source.get_manifest(c.digest) for c in children]
        for raw in raws:
            sig = _parse_manifest(raw, "signature manifest")
            if sig.artifact_type != ARTIFACT_SIGNATURE:
                continue  # another kind of referrer (an SBOM...): not ours to judge
            # a malformed signature is passed on as it is: trust.py refuses it, naming it
            layer = b""
            if len(sig.layers) == 1 and sig.layers[0].size <= MAX_SIGNATURE_BYTES:
                layer = _small_blob(source, sig.layers[0], blobs, MAX_SIGNATURE_BYTES)
            signatures.append((raw, layer))
    return FetchedVariant(bundle_digest, index_bytes, entry.digest, manifest, config, signatures)


def fetch_layers(source: BlobSource, fetched: FetchedVariant, staging_dir: Path) -> None:
    """Download every layer of the fetched manifest into staging (resuming), filling `files`."""
    m = _parse_manifest(fetched.manifest, fetched.manifest_digest)
    blobs = staging_dir / "blobs"
    for layer in m.layers:
        dest = _blob_path(blobs, layer.digest)
        got = source.fetch_blob(layer, dest)
        fetched.stats.blobs += got.blobs
        fetched.stats.bytes += got.bytes
        fetched.stats.resumed += got.resumed
        fetched.files[layer.digest] = dest


def fetch_variant(
    source: BlobSource, tag_or_digest: str, variant: str, staging_dir: Path
) -> FetchedVariant:
    """Everything one variant needs, and nothing of the other variants."""
    fetched = fetch_metadata(source, tag_or_digest, variant, staging_dir)
    fetch_layers(source, fetched, staging_dir)
    return fetched
