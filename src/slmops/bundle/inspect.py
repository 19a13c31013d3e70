"""What is in a bundle, for `slmops inspect`: variants, descriptors, selection, sizes, signers.

Inspection reads manifests and configs only (each checked against its digest and size limit,
as everywhere), never the weights, so it is instant on a multi-gigabyte bundle. It lists
signatures without checking them: trust needs keys, and that is `slmops verify`'s job; the
output says so, so nobody mistakes a listed signer for a verified one.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from slmops.bundle.layout import BundleFormatError, Descriptor, Index, Manifest, parse_model
from slmops.bundle.media import (
    ANN_BUNDLE_NAME,
    ANN_CREATED,
    ANN_KEY_FINGERPRINT,
    ANN_TITLE,
    ANN_VERSION,
    ARTIFACT_ADAPTER,
    ARTIFACT_SIGNATURE,
    ARTIFACT_VARIANT,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MT_INDEX,
    MT_MANIFEST,
)
from slmops.bundle.tarball import open_bundle
from slmops.protocol.bundle import BundleInfo, VariantDescriptor

UNVERIFIED_NOTE = "signatures are listed, not verified: run `slmops verify BUNDLE --trust KEY.pub`"


def _files(layers: list[Descriptor]) -> list[dict[str, Any]]:
    return [
        {
            "title": x.annotation(ANN_TITLE),
            "media_type": x.media_type,
            "size": x.size,
            "digest": x.digest,
        }
        for x in layers
    ]


def inspect_bundle(path: Path) -> dict[str, Any]:
    """Summary of a bundle directory or .tar as plain JSON-ready data."""
    try:
        return _inspect(Path(path))
    except tarfile.TarError as exc:  # a member's data ends early: a truncated tarball
        raise BundleFormatError(
            f"corrupt or truncated tarball: {exc}", where=path, hint="copy the tarball again"
        ) from None


def _inspect(path: Path) -> dict[str, Any]:
    with open_bundle(path) as r:
        r.read_layout_version()
        top = r.read_index()
        roots = [d for d in top.manifests if d.media_type == MT_INDEX]
        if len(roots) != 1:
            raise BundleFormatError(
                f"index.json lists {len(roots)} bundle indexes; a bundle has exactly one",
                where=path,
                hint="this is not a bundle written by `slmops bundle`",
            )
        root = roots[0]
        index = parse_model(
            Index, r.read_json(root, MAX_MANIFEST_BYTES, what="bundle index"), where=str(path)
        )
        if index.artifact_type == ARTIFACT_ADAPTER:
            from slmops.bundle.adapter import inspect_adapter

            return inspect_adapter(r, top, root, index, path)
        variants: list[dict[str, Any]] = []
        info: BundleInfo | None = None
        report: list[dict[str, Any]] = []
        layer_bytes = 0
        blobs: dict[str, int] = {root.digest: root.size}  # every unique blob: what is stored
        layers: dict[str, int] = {}  # unique layer blobs: what dedup leaves of layer_bytes
        for d in index.manifests:
            m = parse_model(
                Manifest, r.read_json(d, MAX_MANIFEST_BYTES, what=d.digest), where=d.digest
            )
            config = r.read_json(m.config, MAX_CONFIG_BYTES, what=f"{d.digest} config")
            blobs |= {x.digest: x.size for x in [d, m.config, *m.layers]}
            layer_bytes += sum(x.size for x in m.layers)
            layers |= {x.digest: x.size for x in m.layers}
            if m.artifact_type == ARTIFACT_VARIANT:
                desc = parse_model(VariantDescriptor, config, where=f"{d.digest} config")
                variants.append(
                    {
                        "name": desc.name,
                        "manifest_digest": d.digest,
                        "descriptor": desc.model_dump(mode="json", by_alias=True),
                        "size_bytes": sum(x.size for x in m.layers),
                        "files": _files(m.layers),
                    }
                )
            else:
                info = parse_model(BundleInfo, config, where=f"{d.digest} config")
                report = _files(m.layers)
        signatures = []
        for d in top.manifests:
            if d.media_type != MT_MANIFEST:
                continue
            m = parse_model(
                Manifest, r.read_json(d, MAX_MANIFEST_BYTES, what=d.digest), where=d.digest
            )
            if m.artifact_type != ARTIFACT_SIGNATURE:
                continue
            notes = m.annotations or {}
            signatures.append(
                {
                    "key": notes.get(ANN_KEY_FINGERPRINT),
                    "signed_at": notes.get(ANN_CREATED),
                    "manifest_digest": d.digest,
                    "covers_this_bundle": m.subject is not None and m.subject.digest == root.digest,
                }
            )
    unique_layers = sum(layers.values())
    return {
        "path": str(path),
        "name": index.annotation(ANN_BUNDLE_NAME),
        "version": index.annotation(ANN_VERSION),
        "created": index.annotation(ANN_CREATED),
        "digest": root.digest,
        "signed_by": [s["key"] for s in signatures if s["covers_this_bundle"]],
        "signatures": signatures,
        "signatures_verified": False,
        "note": UNVERIFIED_NOTE,
        "origin_digest": info.origin_digest if info else None,
        "slmops_version": info.slmops_version if info else None,
        "selection": info.selection if info else {},
        "variants": variants,
        "report": report,
        "total_bytes": sum(blobs.values()),
        "layer_bytes": layer_bytes,
        "unique_layer_bytes": unique_layers,
        "dedup_saved_bytes": layer_bytes - unique_layers,
    }
