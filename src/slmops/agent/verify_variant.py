"""Verify ONE variant of a signed bundle without downloading the others.

A device fetches the bundle index, one variant manifest, its config and layers, and the
signature manifests. The chain of trust is the same as `slmops verify` (bundle/verify.py):

    trusted key -> signature payload names the bundle digest, name, version
    bundle digest = sha256(bundle index bytes) -> index lists this manifest digest
    sha256(manifest bytes) = manifest digest -> config digest, layer digests and sizes
    sha256(config) -> VariantDescriptor;   sha256(each layer file) -> the model's files

Split in two so the agent checks the cheap part (`verify_metadata`: a few KB, including the
signature) before it downloads gigabytes for an untrusted or tampered bundle, and hashes the
layers (`verify_layers`, streaming) once they are on disk. Every failure raises
`VariantCheckError` (a CheckFailedError) naming the first thing that did not match.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops.bundle.layout import (
    BundleFormatError,
    Descriptor,
    Index,
    Manifest,
    parse_model,
    verify_stream,
)
from slmops.bundle.media import (
    ANN_BUNDLE_NAME,
    ANN_TITLE,
    ANN_VERSION,
    ARTIFACT_BUNDLE,
    ARTIFACT_VARIANT,
    LAYER_TYPES,
    MAX_BLOB_BYTES,
    MT_MANIFEST,
    MT_VARIANT_CONFIG,
)
from slmops.bundle.trust import SignatureCandidate, verify_signatures
from slmops.core.digest import sha256_bytes
from slmops.core.errors import CheckFailedError
from slmops.protocol.bundle import VariantDescriptor

_T = TypeVar("_T", Index, Manifest)
RESERVED_PREFIX = ".slmops"  # slot marker and temp files: a layer may not be named like them


class VariantCheckError(CheckFailedError):
    """The variant, its bundle or its signature failed a check (exit code 1)."""


@dataclass(frozen=True)
class Layer:
    title: str  # relative file name inside the variant folder, validated
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class VerifiedVariant:
    bundle_digest: str
    name: str  # bundle (model) name
    version: str
    manifest_digest: str
    descriptor: VariantDescriptor
    layers: list[Layer]
    signed_by: list[str]


sha256_hex = sha256_bytes  # the one sha helper (core/digest.py), under its old name here


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VariantCheckError(f"{what} is not valid JSON: {exc}") from None


def _parse(cls: type[_T], data: bytes, what: str) -> _T:
    try:
        return parse_model(cls, _json(data, what), where=what)
    except BundleFormatError as exc:
        raise VariantCheckError(exc.message, where=exc.where, hint=exc.hint) from None


def safe_title(title: str | None, where: str) -> str:
    """A layer's file name as a safe relative path: no absolute path, `..`, or reserved name."""
    if not title:
        raise VariantCheckError("layer has no file name (title annotation)", where=where)
    p = PurePosixPath(title)
    bad = (
        p.is_absolute()
        or "\\" in title
        or "\x00" in title
        or any(part in ("", ".", "..") for part in title.split("/"))
        or any(part.startswith(RESERVED_PREFIX) for part in p.parts)
    )
    if bad:
        raise VariantCheckError(
            f"unsafe layer file name {title!r}",
            where=where,
            hint="the bundle was crafted to write outside its folder; do not deploy it",
        )
    return title


def verify_metadata(
    bundle_index: bytes,
    bundle_digest: str,
    signatures: Sequence[tuple[bytes, bytes]],
    manifest: bytes,
    manifest_digest: str,
    config: bytes,
    trusted_keys: Mapping[str, Ed25519PublicKey],
) -> VerifiedVariant:
    """Check everything but the layer bytes; `signatures` holds (manifest, layer blob) pairs."""
    if sha256_hex(bundle_index) != bundle_digest:
        raise VariantCheckError(
            f"bundle index bytes hash to {sha256_hex(bundle_index)}, expected {bundle_digest}"
        )
    index = _parse(Index, bundle_index, f"bundle index {bundle_digest}")
    name, version = index.annotation(ANN_BUNDLE_NAME), index.annotation(ANN_VERSION)
    if index.artifact_type != ARTIFACT_BUNDLE or not name or not version:
        raise VariantCheckError("not an slmops bundle index", where=bundle_digest)
    signed_by = _check_signatures(signatures, bundle_digest, name, version, trusted_keys)
    entry = next((d for d in index.manifests if d.digest == manifest_digest), None)
    if entry is None or entry.media_type != MT_MANIFEST or entry.artifact_type != ARTIFACT_VARIANT:
        raise VariantCheckError(
            f"the signed bundle index lists no variant manifest {manifest_digest}",
            where=f"{name}:{version}",
        )
    if sha256_hex(manifest) != manifest_digest or len(manifest) != entry.size:
        raise VariantCheckError(
            f"variant manifest does not match its digest {manifest_digest}", where=name
        )
    m = _parse(Manifest, manifest, f"variant manifest {manifest_digest}")
    if m.artifact_type != ARTIFACT_VARIANT or m.config.media_type != MT_VARIANT_CONFIG:
        raise VariantCheckError("not a variant manifest", where=manifest_digest)
    if sha256_hex(config) != m.config.digest or len(config) != m.config.size:
        raise VariantCheckError("variant config does not match its digest", where=m.config.digest)
    try:
        descriptor = parse_model(VariantDescriptor, _json(config, "config"), where="config")
    except BundleFormatError as exc:
        raise VariantCheckError(exc.message, where=exc.where) from None
    layers = [_layer(d, manifest_digest) for d in m.layers]
    titles = [x.title for x in layers]
    if len(set(titles)) != len(titles):
        raise VariantCheckError("two layers have the same file name", where=manifest_digest)
    return VerifiedVariant(
        bundle_digest, name, version, manifest_digest, descriptor, layers, signed_by
    )


def _layer(d: Descriptor, where: str) -> Layer:
    title = safe_title(d.annotation(ANN_TITLE), where)
    if d.media_type not in LAYER_TYPES or d.size > MAX_BLOB_BYTES:
        raise VariantCheckError(f"layer {title}: bad media type or size", where=where)
    return Layer(title, d.digest, d.size, d.media_type)


def _check_signatures(
    signatures: Sequence[tuple[bytes, bytes]],
    digest: str,
    name: str,
    version: str,
    keys: Mapping[str, Ed25519PublicKey],
) -> list[str]:
    """The one chain of trust (bundle/trust.py): a malformed signature manifest or a key that
    does not match its annotation is an error naming the manifest, as in `slmops verify`."""
    candidates: list[SignatureCandidate] = []
    for raw, layer_bytes in signatures:
        what = f"signature manifest {sha256_bytes(raw)}"
        m = _parse(Manifest, raw, what)
        candidates.append(SignatureCandidate(what, m, functools.partial(bytes, layer_bytes)))
    try:
        return verify_signatures(candidates, digest, name, version, keys, where=digest)
    except BundleFormatError as exc:
        raise VariantCheckError(exc.message, where=exc.where, hint=exc.hint) from None


def verify_layers(variant: VerifiedVariant, files: Mapping[str, Path]) -> None:
    """Hash every layer file (by digest in `files`), streaming; raise on the first mismatch."""
    for layer in variant.layers:
        path = files.get(layer.digest)
        if path is None:
            raise VariantCheckError(f"layer {layer.title} was not downloaded", where=layer.digest)
        try:
            with Path(path).open("rb") as fh:
                verify_stream(fh, layer.digest, layer.size, what=f"layer {layer.title}")
        except FileNotFoundError:
            raise VariantCheckError(f"layer {layer.title} is missing", where=path) from None
        except BundleFormatError as exc:
            raise VariantCheckError(exc.message, where=exc.where, hint=exc.hint) from None


def verify_variant(
    bundle_index: bytes,
    bundle_digest: str,
    signatures: Sequence[tuple[bytes, bytes]],
    manifest: bytes,
    manifest_digest: str,
    config: bytes,
    files: Mapping[str, Path],
    trusted_keys: Mapping[str, Ed25519PublicKey],
) -> VerifiedVariant:
    """All checks of one variant: metadata and signature first, then every layer's bytes."""
    variant = verify_metadata(
        bundle_index, bundle_digest, signatures, manifest, manifest_digest, config, trusted_keys
    )
    verify_layers(variant, files)
    return variant
