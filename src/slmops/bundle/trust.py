"""The chain of trust, once: which signature manifests vouch for a bundle, by which trusted keys.

Used by `slmops verify` (bundle/verify.py, a whole bundle on disk) and by the edge agent
(agent/verify_variant.py, one variant fetched from a registry), so both accept and refuse the
same bundles. The rule:

- A manifest that is a signature (artifactType ``ARTIFACT_SIGNATURE``) must be well formed: an
  empty config, exactly one ``MT_SIGNATURE`` layer whose bytes match their digest, a subject, and
  a signature layer whose key is the key named in the manifest's fingerprint annotation. A
  malformed one is an error naming that manifest, never skipped: a tampered signature is a sign
  of tampering, and skipping it would let the two verifiers disagree.
- A well-formed signature over another digest, or by a key that is not trusted, vouches for
  nothing; a trusted one must verify (ed25519 over its payload, the payload naming this digest,
  name and version) or it is an error.
- With ``require``, at least one trusted signature must vouch for the bundle.

Agent-safe: the standard library, cryptography, pydantic and slmops.core/protocol/bundle only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops.bundle.layout import BundleFormatError, Manifest, parse_model
from slmops.bundle.media import ANN_KEY_FINGERPRINT, ARTIFACT_SIGNATURE, MT_EMPTY, MT_SIGNATURE
from slmops.bundle.signing import MAX_SIGNATURE_BYTES, SignatureBlob, check_signature
from slmops.core.digest import sha256_bytes

HINT = "do not deploy it; fetch the bundle again"


@dataclass(frozen=True)
class SignatureCandidate:
    """One signature manifest and a way to read its layer (called only once it is well formed)."""

    what: str  # names the manifest in errors, e.g. "signature manifest sha256:..."
    manifest: Manifest
    read_layer: Callable[[], bytes]


def _fail(message: str, where: str, hint: str = HINT) -> BundleFormatError:
    return BundleFormatError(message, where=where, hint=hint)


def is_signature(manifest: Manifest) -> bool:
    return manifest.artifact_type == ARTIFACT_SIGNATURE


def signature_blob(c: SignatureCandidate) -> tuple[str, SignatureBlob]:
    """The manifest's subject digest and its signature layer, after every structural check."""
    m, what = c.manifest, c.what
    if not is_signature(m):
        raise _fail(f"artifactType {m.artifact_type!r}, expected {ARTIFACT_SIGNATURE}", what)
    if m.config.media_type != MT_EMPTY or len(m.layers) != 1:
        raise _fail(f"expected an empty config and one {MT_SIGNATURE} layer", what)
    layer = m.layers[0]
    if layer.media_type != MT_SIGNATURE:
        raise _fail(f"layer media type {layer.media_type!r}, expected {MT_SIGNATURE}", what)
    if layer.size > MAX_SIGNATURE_BYTES:
        raise _fail(
            f"signature layer declared {layer.size} bytes, over {MAX_SIGNATURE_BYTES}", what
        )
    if m.subject is None:
        raise _fail("signature manifest has no subject", what)
    data = c.read_layer()
    if len(data) != layer.size or sha256_bytes(data) != layer.digest:
        raise _fail("signature layer does not match its digest", what)
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"signature layer is not JSON: {exc}", what) from None
    blob = parse_model(SignatureBlob, obj, where=what)
    fp = (m.annotations or {}).get(ANN_KEY_FINGERPRINT, "")
    if blob.key != fp:
        raise _fail(f"layer names key {blob.key}, manifest annotation {fp or '(none)'}", what)
    return m.subject.digest, blob


def verify_signatures(
    candidates: Iterable[SignatureCandidate],
    digest: str,
    name: str,
    version: str,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    where: str,
    require: bool = True,
) -> list[str]:
    """Fingerprints of the trusted keys whose signatures vouch for `digest` as name:version.

    Raises BundleFormatError naming the manifest for a malformed signature or a trusted one that
    does not verify, and (with `require`) naming `where` when no trusted signature vouches.
    """
    signed_by: list[str] = []
    untrusted: list[str] = []
    other: list[str] = []
    for c in candidates:
        subject, blob = signature_blob(c)
        if subject != digest:
            other.append(subject)
        elif blob.key not in keys:
            untrusted.append(blob.key)
        else:
            check_signature(blob, keys[blob.key], digest, name, version, c.what)
            if blob.key not in signed_by:
                signed_by.append(blob.key)
    if require and not signed_by:
        trusted = ", ".join(keys) or "none"
        if untrusted:
            raise _fail(
                f"signed by {', '.join(untrusted)}, which is not among the trusted keys "
                f"({trusted}): {name}:{version} has only untrusted signatures",
                where,
                "trust the signer's .pub (--trust), or deploy a bundle signed by a trusted key",
            )
        if other:
            raise _fail(
                f"its signatures cover {', '.join(other)}, not this bundle ({digest})",
                where,
                "the bundle changed after it was signed; sign it again or fetch the signed one",
            )
        raise _fail(
            f"the bundle is not signed: {name}:{version} has no signature",
            where,
            "sign it with `slmops sign BUNDLE --key KEY`",
        )
    return signed_by
