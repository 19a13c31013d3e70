"""ed25519 keys and detached bundle signatures.

A signature covers the bundle index digest. That digest names every variant manifest, which
names every layer (weights, tokenizer, runtime config, lineage card) and every config (the
descriptors a device matches on), plus the bundle manifest with the eval report: one signature
over a few hundred bytes proves all of it, and a verifier needs no per-file signatures.

What is signed is a small canonical JSON payload (schema, bundle digest, key fingerprint, name,
version, time), not the bare digest, so a signature cannot be replayed for another name or
version. It is stored as an OCI artifact whose `subject` is the bundle index (the OCI 1.1
referrers shape, so registries can list it) and listed in the unsigned top-level index.json.

A key's fingerprint is `sha256:` + the full hex SHA-256 of its raw 32-byte public key; it is
what trust decisions and error messages name.

This module is imported by verify.py and so by the edge agent: standard library, pydantic,
cryptography and slmops.core/protocol/bundle only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field

from slmops.bundle.layout import (
    EMPTY_JSON,
    INDEX_FILE,
    BundleFormatError,
    Descriptor,
    Index,
    Manifest,
    OciLayout,
    parse_model,
)
from slmops.bundle.layout import canonical_json as _canonical
from slmops.bundle.media import (
    ANN_CREATED,
    ANN_KEY_FINGERPRINT,
    ARTIFACT_SIGNATURE,
    MT_EMPTY,
    MT_INDEX,
    MT_MANIFEST,
    MT_SIGNATURE,
)
from slmops.bundle.tarball import open_bundle, rewrite_tar
from slmops.core.atomic import TMP_PREFIX
from slmops.core.config import StrictModel
from slmops.core.errors import ConfigError, UserInputError

SIGNATURE_SCHEMA = "slmops.signature/v1"
MAX_SIGNATURE_BYTES = 64 << 10  # a signature layer is ~400 bytes of JSON
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")


class SignaturePayload(StrictModel):
    """The signed statement: this key vouches for this bundle digest as NAME:VERSION."""

    schema_: str = Field(SIGNATURE_SCHEMA, alias="schema")
    bundle_digest: str
    key: str
    name: str
    version: str
    signed_at: str
    model_config = StrictModel.model_config | {"populate_by_name": True}


class SignatureBlob(StrictModel):
    """The signature layer: base64 payload bytes exactly as signed, the signature, the key."""

    payload: str
    signature: str
    key: str


@dataclass(frozen=True)
class SignatureInfo:
    bundle_digest: str
    key: str  # fingerprint of the signing key
    name: str
    version: str
    signed_at: str
    manifest_digest: str  # the signature manifest added to index.json
    path: Path


def fingerprint(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_key_file(path, "public key (.pub)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"not a PEM public key: {exc}", where=path, hint="pass a .pub from `slmops keys init`"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"not an ed25519 key ({type(key).__name__})", where=path)
    return key


def fingerprint_file(path: Path) -> str:
    return fingerprint(load_public_key(path))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key_file(path, "private key (.key)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"not an unencrypted PEM private key: {exc}",
            where=path,
            hint="pass the .key file from `slmops keys init` (not the .pub)",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"not an ed25519 key ({type(key).__name__})", where=path)
    return key


def load_trusted_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """Fingerprint -> key for each trusted public key file (bad files are exit-2 input errors)."""
    return {fingerprint(k): k for k in (load_public_key(Path(p)) for p in paths)}


def check_signature(
    blob: SignatureBlob, key: Ed25519PublicKey, digest: str, name: str, version: str, where: str
) -> None:
    """Check a signature layer by a trusted key: the ed25519 signature over the payload bytes,
    then that the payload vouches for exactly this digest, name and version."""

    def fail(message: str, hint: str = "do not deploy it; fetch the bundle again") -> Exception:
        return BundleFormatError(message, where=where, hint=hint)

    try:
        payload = base64.b64decode(blob.payload, validate=True)
        signature = base64.b64decode(blob.signature, validate=True)
    except (binascii.Error, ValueError):
        raise fail("signature or payload is not valid base64") from None
    try:
        key.verify(signature, payload)
    except InvalidSignature:
        raise fail(
            f"the ed25519 signature by {blob.key} does not verify over its payload",
            "the signature was altered or forged; do not deploy this bundle",
        ) from None
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise fail("signed payload is not JSON") from None
    p = parse_model(SignaturePayload, data, where=where)
    if p.bundle_digest != digest:
        raise fail(f"signed digest {p.bundle_digest}, but this bundle is {digest}")
    if (p.key, p.name, p.version) != (blob.key, name, version):
        raise fail(f"signed for {p.name}:{p.version} by {p.key}; this is {name}:{version}")


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserInputError(
            f"cannot read {what}: {exc.strerror}", where=path, hint="check the path"
        ) from None


def init_keys(out_dir: Path, name: str = "slmops") -> tuple[Path, Path]:
    """Create NAME.key (PKCS8 PEM, mode 0600) and NAME.pub (SubjectPublicKeyInfo PEM).

    Existing files are never overwritten: losing a private key that devices trust is worse than
    an error message.
    """
    if not _KEY_NAME_RE.match(name):
        raise ConfigError(
            f"key name {name!r} is not a plain file name", hint="use letters, digits, . _ -"
        )
    out_dir = Path(out_dir)
    private, public = out_dir / f"{name}{PRIVATE_SUFFIX}", out_dir / f"{name}{PUBLIC_SUFFIX}"
    for p in (private, public):
        if p.exists() or p.is_symlink():
            raise UserInputError(
                "key file already exists; refusing to overwrite it",
                where=p,
                hint="choose another --out or --name (devices trusting the old key need its .pub)",
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private, pem, 0o600)
    try:
        _write_new(public, pub, 0o644)
    except BaseException:
        private.unlink(missing_ok=True)
        raise
    return private, public


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a complete file under `path` only if nothing is there: temp (created with `mode`
    from the start, so a secret is never readable by others), fsync, then link (no clobber)."""
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise UserInputError(
                "key file already exists; refusing to overwrite it", where=path
            ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def sign_bundle(
    bundle_path: Path, private_key_path: Path, *, signed_at: str | None = None
) -> SignatureInfo:
    """Sign a bundle (layout directory or .tar) in place; replaces this key's older signature.

    The bundle is verified first (digests, sizes, structure): a signature vouches for content,
    so tampered content must never get one.
    """
    from slmops.bundle.verify import verify_bundle  # verify imports this module: import late

    bundle_path = Path(bundle_path)
    key = load_private_key(private_key_path)
    fp = fingerprint(key.public_key())
    checked = verify_bundle(bundle_path, [], require_signature=False)
    signed_at = signed_at or datetime.now(UTC).isoformat()
    payload = _canonical(
        SignaturePayload(
            bundle_digest=checked.digest,
            key=fp,
            name=checked.name,
            version=checked.version,
            signed_at=signed_at,
        ).model_dump(by_alias=True)
    )
    blob = SignatureBlob(
        payload=base64.b64encode(payload).decode(),
        signature=base64.b64encode(key.sign(payload)).decode(),
        key=fp,
    )
    new: dict[str, bytes] = {}

    def put(data: bytes, media_type: str, **kw: str | dict[str, str]) -> Descriptor:
        desc = Descriptor.model_validate(
            {"mediaType": media_type, "digest": _digest(data), "size": len(data), **kw}
        )
        new[desc.digest] = data
        return desc

    with open_bundle(bundle_path) as reader:
        top = reader.read_index()
        subject = next(d for d in top.manifests if d.media_type == MT_INDEX)  # verified: one
        manifest = Manifest(
            media_type=MT_MANIFEST,
            artifact_type=ARTIFACT_SIGNATURE,
            config=put(EMPTY_JSON, MT_EMPTY),
            layers=[put(_canonical(blob.model_dump()), MT_SIGNATURE)],
            subject=Descriptor(media_type=MT_INDEX, digest=subject.digest, size=subject.size),
            annotations={ANN_KEY_FINGERPRINT: fp, ANN_CREATED: signed_at},
        )
        entry = put(
            _canonical(manifest.to_oci()),
            MT_MANIFEST,
            artifactType=ARTIFACT_SIGNATURE,
            annotations={ANN_KEY_FINGERPRINT: fp},
        )
        keep = [
            d
            for d in top.manifests
            if not (
                d.artifact_type == ARTIFACT_SIGNATURE and d.annotation(ANN_KEY_FINGERPRINT) == fp
            )
        ]
        index = Index(manifests=[*keep, entry], annotations=top.annotations)
        drop = reader.reachable(top.manifests) - reader.reachable(keep) - set(new)
        rels = {d: reader.blob_rel(d) for d in [*new, *drop]}
    if bundle_path.is_dir():
        layout = OciLayout(bundle_path)
        for data in new.values():
            layout.put_blob_bytes(data, MT_EMPTY)  # media type is not stored with a blob
        layout.write_index(index)
        for d in drop:
            layout.blob_path(d).unlink(missing_ok=True)
    else:
        changes: dict[str, bytes | None] = {rels[d]: data for d, data in new.items()}
        changes |= {rels[d]: None for d in drop}
        changes[INDEX_FILE] = _canonical(index.to_oci())
        rewrite_tar(bundle_path, changes)
    return SignatureInfo(
        checked.digest, fp, checked.name, checked.version, signed_at, entry.digest, bundle_path
    )


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
