"""What the registry accepts as a manifest: well-formed OCI, every child and blob already
pushed, an slmops bundle only under its own signed name and version, an adapter only after its
base. Kept apart from the routes (registry/routes.py) so the rules read in one place."""

from __future__ import annotations

import json
import re
from typing import Any

from slmops.bundle.media import (
    ANN_BUNDLE_NAME,
    ANN_VERSION,
    ARTIFACT_ADAPTER,
    MT_INDEX,
    MT_MANIFEST,
)
from slmops.bundle.oci_ref import DIGEST_RE, Desc, OciContentError
from slmops.bundle.oci_ref import load_manifest as parse_manifest
from slmops.server.registry.store import BlobStore

SIGNATURE_TAG = re.compile(r"^sha256-[0-9a-f]{64}\Z")


class OciError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def check_manifest(
    store: BlobStore, data: bytes, content_type: str, name: str = "", tag: str | None = None
) -> tuple[str, str]:
    """(media type, digest) of an acceptable manifest; raises the OCI error otherwise.

    An slmops bundle index (it names itself in its annotations) is accepted only under its own
    name and version: pushed as another repository or tag, every agent would fail to verify it."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise OciError(400, "MANIFEST_INVALID", "manifest is not JSON") from None
    if not isinstance(obj, dict):
        raise OciError(400, "MANIFEST_INVALID", "manifest is not a JSON object")
    media = obj.get("mediaType") if isinstance(obj, dict) else None
    media = media or content_type
    if media not in (MT_INDEX, MT_MANIFEST) or content_type not in ("", media):
        raise OciError(400, "MANIFEST_INVALID", f"unsupported or conflicting type {media!r}")
    if obj.get("schemaVersion") != 2:
        raise OciError(400, "MANIFEST_INVALID", "schemaVersion must be 2")
    if media == MT_INDEX:
        check_bundle_name(obj, name, tag)
        check_adapter_subject(store, obj)
    desc = Desc(media, "sha256:" + "0" * 64, len(data))
    try:
        _, children, blobs = parse_manifest(data, desc)
    except OciContentError as exc:
        raise OciError(400, "MANIFEST_INVALID", exc.message) from None
    for child in children:
        if store.manifest_type(child.digest) is None:
            raise OciError(400, "MANIFEST_BLOB_UNKNOWN", f"manifest {child.digest} not pushed")
    for blob in blobs:
        if (size := store.size(blob.digest)) is None:
            raise OciError(400, "MANIFEST_BLOB_UNKNOWN", f"blob {blob.digest} not pushed")
        if size != blob.size:
            raise OciError(400, "MANIFEST_INVALID", f"blob {blob.digest} is {size} bytes")
    return media, store.put_manifest(data, media)


def check_bundle_name(obj: dict[str, Any], name: str, tag: str | None) -> None:
    """A bundle index whose signed name or version differs from repository:tag -> 400."""
    notes = obj.get("annotations")
    if not isinstance(notes, dict) or tag is None or SIGNATURE_TAG.match(tag):
        return
    signed_name, signed_version = notes.get(ANN_BUNDLE_NAME), notes.get(ANN_VERSION)
    if signed_name is None:
        return  # not an slmops bundle index (they name themselves): nothing to compare
    if (signed_name, signed_version) != (name, tag):
        raise OciError(
            400,
            "MANIFEST_INVALID",
            f"the bundle is signed as {signed_name}:{signed_version} but was pushed as "
            f"{name}:{tag}; push it under its own name and version",
        )


def check_adapter_subject(store: BlobStore, obj: dict[str, Any]) -> None:
    """An adapter (bundle/adapter.py) is accepted only once its base bundle (subject) is here:
    devices install it over that base, so it is unusable without it."""
    if obj.get("artifactType") != ARTIFACT_ADAPTER:
        return
    subject = obj.get("subject")
    digest = subject.get("digest") if isinstance(subject, dict) else None
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise OciError(400, "MANIFEST_INVALID", "an adapter index needs a subject (its base)")
    if store.manifest_type(digest) is None:
        raise OciError(
            400,
            "MANIFEST_BLOB_UNKNOWN",
            f"the adapter's base bundle {digest} is not in this registry; push the base first",
        )
