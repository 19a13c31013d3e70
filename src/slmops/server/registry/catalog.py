"""The registry's catalog: what a pushed version holds, read back from its bundle index.

``describe`` reads a bundle index and its children from the blob store into a
``VersionPublic`` (variants with their descriptors, the bundle info, sizes, and the problems
met on the way). It has no HTTP in it: the models routes (``registry/model_routes.py``) answer
with it, and desired state (``server/desired.py``) resolves versions to variants with it.
"""

from __future__ import annotations

import json

from pydantic import Field, ValidationError

from slmops.bundle.media import (
    ARTIFACT_BUNDLE,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MT_INDEX,
)
from slmops.bundle.oci_ref import Desc, OciContentError, load_manifest
from slmops.core.config import StrictModel
from slmops.protocol.bundle import BundleInfo, VariantDescriptor
from slmops.server.registry.store import BlobStore, StoreError


class VariantPublic(StrictModel):
    digest: str
    descriptor: VariantDescriptor | None
    layers: int
    bytes: int = Field(description="config + layers")


class VersionPublic(StrictModel):
    name: str
    version: str
    digest: str
    variants: list[VariantPublic]
    bundle: BundleInfo | None
    signatures: int
    total_bytes: int = Field(description="every reference counted, manifests included")
    unique_bytes: int = Field(description="each distinct blob and manifest once")
    problems: list[str] = Field(default_factory=list)


def _config(store: BlobStore, desc: Desc, problems: list[str]) -> dict[str, object] | None:
    try:
        obj = json.loads(store.read_small(desc.digest, MAX_CONFIG_BYTES))
    except (StoreError, ValueError) as exc:
        problems.append(f"config {desc.digest}: {exc}")
        return None
    return obj if isinstance(obj, dict) else None


def describe(
    store: BlobStore, name: str, version: str, digest: str, signatures: int
) -> VersionPublic:
    """Read a bundle index and its children from the store into a VersionPublic."""
    problems: list[str] = []
    out = VersionPublic(
        name=name,
        version=version,
        digest=digest,
        variants=[],
        bundle=None,
        signatures=signatures,
        total_bytes=0,
        unique_bytes=0,
        problems=problems,
    )
    seen: set[str] = set()

    def load(desc: Desc) -> tuple[dict[str, object], list[Desc], list[Desc]]:
        data = store.read_small(desc.digest, MAX_MANIFEST_BYTES)
        out.total_bytes += len(data)
        if desc.digest not in seen:
            seen.add(desc.digest)
            out.unique_bytes += len(data)
        return load_manifest(data, desc)

    def count(blobs: list[Desc]) -> int:
        size = 0
        for blob in blobs:
            size += blob.size
            if blob.digest not in seen:
                seen.add(blob.digest)
                out.unique_bytes += blob.size
        out.total_bytes += size
        return size

    try:
        _, children, _ = load(Desc(MT_INDEX, digest, 0))
        for child in children:
            obj, _, blobs = load(child)
            size = count(blobs)
            config = _config(store, blobs[0], problems) if blobs else None
            if child.artifact_type == ARTIFACT_BUNDLE or obj.get("artifactType") == ARTIFACT_BUNDLE:
                try:
                    out.bundle = BundleInfo.model_validate(config)
                except ValidationError as exc:
                    problems.append(f"bundle info {blobs[0].digest}: {exc.error_count()} error(s)")
                continue
            try:
                descriptor = VariantDescriptor.model_validate(config)
            except ValidationError as exc:
                descriptor = None
                problems.append(f"variant descriptor {child.digest}: {exc.error_count()} error(s)")
            out.variants.append(
                VariantPublic(
                    digest=child.digest, descriptor=descriptor, layers=len(blobs) - 1, bytes=size
                )
            )
    except (StoreError, OciContentError) as exc:
        problems.append(f"bundle {digest}: {exc}")
    return out
