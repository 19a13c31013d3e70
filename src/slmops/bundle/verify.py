"""Verify a bundle offline: structure, every byte, and a signature by a trusted key.

The edge agent imports this module, so it uses only the standard library, pydantic,
cryptography and slmops.core/protocol/bundle (a test in tests/bundle keeps it that way).

Checks run cheapest first and stop at the first failure, which the error names (which
manifest or blob, expected vs found):

1. `oci-layout` declares version 1.0.0; `index.json` parses and lists one bundle index.
2. Every manifest and config: declared size within its limit before a byte is read, then read
   and checked against its digest; media types and artifact types known; schemaVersion 2;
   variant configs parse as `VariantDescriptor`, the bundle config as `BundleInfo`.
3. Every layer: known media type, declared size within `MAX_BLOB_BYTES`, blob present with
   exactly the declared size (a stat, no reading yet).
4. The signature: a signature manifest whose subject is the bundle index, by a trusted key,
   whose ed25519 signature verifies over its payload, and whose payload names this digest.
5. Every layer blob hashed, streamed in 1 MiB chunks: memory stays flat for any weight size.
   This is last because it is the only step whose cost grows with the model.

A tarball is verified in place (tarball.TarLayout), after its members pass the same checks as
`safe_extract`.
"""

from __future__ import annotations

import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops.bundle.layout import (
    BundleFormatError,
    Descriptor,
    Index,
    LayoutReader,
    Manifest,
    OciLayout,
    check_digest,
    parse_model,
    verify_stream,
)
from slmops.bundle.media import (
    ANN_BUNDLE_NAME,
    ANN_TITLE,
    ANN_VARIANT,
    ANN_VERSION,
    ARTIFACT_BUNDLE,
    ARTIFACT_SIGNATURE,
    ARTIFACT_TYPES,
    ARTIFACT_VARIANT,
    CONFIG_TYPES,
    LAYER_TYPES,
    MAX_BLOB_BYTES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MT_BUNDLE_CONFIG,
    MT_INDEX,
    MT_MANIFEST,
    MT_VARIANT_CONFIG,
)
from slmops.bundle.signing import MAX_SIGNATURE_BYTES, load_trusted_keys
from slmops.bundle.tarball import UnsafeArchiveError, open_bundle
from slmops.bundle.trust import SignatureCandidate, verify_signatures
from slmops.core.errors import CheckFailedError, UserInputError
from slmops.protocol.bundle import BundleInfo, VariantDescriptor

OnBlob = Callable[[str, int], None]  # (blob being hashed, its size): drives a progress bar


class BundleVerificationError(CheckFailedError):
    """The bundle failed verification (exit code 1); the message names the first failure."""


@dataclass(frozen=True)
class VerifyResult:
    digest: str  # the bundle index digest
    name: str
    version: str
    variants: list[str]
    signed_by: list[str] = field(default_factory=list)  # fingerprints of verified trusted keys
    bytes_verified: int = 0


def verify_blob_file(path: Path, digest: str, size: int) -> None:
    """Check one downloaded file against its descriptor, streaming (for the agent's fetcher)."""
    try:
        check_digest(digest, where=str(path))
        st = Path(path).lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            kind = f"{st.st_size} bytes" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise BundleFormatError(f"expected {size} bytes for {digest}, found {kind}", where=path)
        with Path(path).open("rb") as fh:
            verify_stream(fh, digest, size, what=str(path))
    except FileNotFoundError:
        raise BundleVerificationError(f"missing (expected blob {digest})", where=path) from None
    except BundleFormatError as exc:
        raise BundleVerificationError(exc.message, where=exc.where, hint=exc.hint) from None


def verify_bundle(
    path: Path,
    trusted_keys: list[Path],
    *,
    require_signature: bool = True,
    on_blob: OnBlob | None = None,
) -> VerifyResult:
    """Verify a bundle directory or .tar; raise BundleVerificationError naming the first failure."""
    keys = load_trusted_keys(trusted_keys)
    if require_signature and not keys:
        raise UserInputError(
            "no trusted public key given",
            where=path,
            hint="pass --trust KEY.pub (the signer's public key from `slmops keys init`)",
        )
    try:
        with open_bundle(Path(path)) as reader:
            from slmops.bundle.adapter_verify import root_is_adapter, verify_adapter_layout

            if root_is_adapter(reader):  # an adapter artifact (bundle/adapter.py)
                return verify_adapter_layout(
                    reader, keys, require_signature=require_signature, on_blob=on_blob
                )[0]
            return _Verifier(reader, keys, require_signature, on_blob).run()
    except (BundleFormatError, UnsafeArchiveError) as exc:
        raise BundleVerificationError(exc.message, where=exc.where, hint=exc.hint) from None
    except tarfile.TarError as exc:  # a member's data ends early: a truncated tarball
        raise BundleVerificationError(
            f"corrupt or truncated tarball: {exc}", where=path, hint="copy the tarball again"
        ) from None


def _fail(message: str, where: str, hint: str | None = None) -> BundleFormatError:
    return BundleFormatError(
        message, where=where, hint=hint or "do not deploy it; fetch the bundle again"
    )


class _Verifier:
    def __init__(
        self,
        reader: LayoutReader,
        keys: dict[str, Ed25519PublicKey],
        require_signature: bool,
        on_blob: OnBlob | None,
    ):
        self.r, self.keys, self.require, self.on_blob = reader, keys, require_signature, on_blob
        self.where = reader.where
        self.variants: list[str] = []

    def run(self) -> VerifyResult:
        self.r.read_layout_version()
        if isinstance(self.r, OciLayout):
            for sub in (self.r.root / "blobs", self.r.root / "blobs" / "sha256"):
                if sub.is_symlink() or not sub.is_dir():
                    raise _fail(f"{sub.name}/ is missing or is a symlink", self.where)
        top = self.r.read_index()
        bundles = [d for d in top.manifests if d.media_type == MT_INDEX]
        signatures = [d for d in top.manifests if d.media_type == MT_MANIFEST]
        for i, d in enumerate(top.manifests):
            if d.media_type not in (MT_INDEX, MT_MANIFEST):
                raise _fail(
                    f"index.json manifests[{i}]: unknown media type {d.media_type!r}", self.where
                )
            self._known_artifact(d, f"index.json manifests[{i}]")
        if len(bundles) != 1:
            raise _fail(
                f"index.json lists {len(bundles)} bundle indexes; a bundle has exactly one",
                self.where,
            )
        bundle = bundles[0]
        index = self._index(bundle)
        name, version = index.annotation(ANN_BUNDLE_NAME), index.annotation(ANN_VERSION)
        if not name or not version:
            raise _fail(
                "the bundle index lacks its name or version annotation", self._at(bundle.digest)
            )
        layers = self._manifests(index, name, version)
        signed_by = self._signatures(signatures, bundle, name, version)
        total = 0
        for layer, what in layers.values():
            if self.on_blob is not None:
                self.on_blob(what, layer.size)
            self.r.verify_blob(layer, what=what)
            total += layer.size
        return VerifyResult(bundle.digest, name, version, self.variants, signed_by, total)

    def _at(self, what: str) -> str:
        return f"{self.where}: {what}"

    def _known_artifact(self, d: Descriptor, what: str) -> None:
        if d.artifact_type is not None and d.artifact_type not in ARTIFACT_TYPES:
            raise _fail(f"unknown artifactType {d.artifact_type!r}", self._at(what))

    def _index(self, d: Descriptor) -> Index:
        what = f"bundle index {d.digest}"
        index = parse_model(
            Index, self.r.read_json(d, MAX_MANIFEST_BYTES, what=what), where=self._at(what)
        )
        if index.media_type != MT_INDEX or index.artifact_type != ARTIFACT_BUNDLE:
            raise _fail(
                f"mediaType {index.media_type!r} / artifactType {index.artifact_type!r}, expected "
                f"{MT_INDEX} / {ARTIFACT_BUNDLE}",
                self._at(what),
            )
        return index

    def _manifest(self, d: Descriptor, what: str, artifact: str) -> Manifest:
        if d.media_type != MT_MANIFEST:
            raise _fail(f"media type {d.media_type!r}, expected {MT_MANIFEST}", self._at(what))
        self._known_artifact(d, what)
        m = parse_model(
            Manifest, self.r.read_json(d, MAX_MANIFEST_BYTES, what=what), where=self._at(what)
        )
        if m.media_type != MT_MANIFEST or m.artifact_type != artifact:
            raise _fail(
                f"mediaType {m.media_type!r} / artifactType {m.artifact_type!r}, expected "
                f"{MT_MANIFEST} / {artifact}",
                self._at(what),
            )
        if d.artifact_type not in (None, artifact):
            raise _fail(
                f"descriptor says {d.artifact_type}, manifest says {artifact}", self._at(what)
            )
        if m.config.media_type not in CONFIG_TYPES:
            raise _fail(f"config has unknown media type {m.config.media_type!r}", self._at(what))
        return m

    def _manifests(
        self, index: Index, name: str, version: str
    ) -> dict[str, tuple[Descriptor, str]]:
        """Structure of every variant and bundle manifest; returns the layers still to hash."""
        info: BundleInfo | None = None
        layers: dict[str, tuple[Descriptor, str]] = {}
        for i, d in enumerate(index.manifests):
            kind = d.artifact_type or ""
            variant = d.annotation(ANN_VARIANT)
            what = (
                f"variant {variant} manifest"
                if variant
                else ("bundle manifest" if kind == ARTIFACT_BUNDLE else f"manifest {i} {d.digest}")
            )
            if kind not in (ARTIFACT_VARIANT, ARTIFACT_BUNDLE):
                raise _fail(
                    f"artifactType {kind!r}, expected {ARTIFACT_VARIANT} or {ARTIFACT_BUNDLE}",
                    self._at(what),
                )
            m = self._manifest(d, what, kind)
            config_type = MT_VARIANT_CONFIG if kind == ARTIFACT_VARIANT else MT_BUNDLE_CONFIG
            if m.config.media_type != config_type:
                raise _fail(
                    f"config media type {m.config.media_type!r}, expected {config_type}",
                    self._at(what),
                )
            data = self.r.read_json(m.config, MAX_CONFIG_BYTES, what=f"{what} config")
            if kind == ARTIFACT_VARIANT:
                desc = parse_model(VariantDescriptor, data, where=self._at(f"{what} config"))
                if desc.name != d.annotation(ANN_VARIANT) or desc.name in self.variants:
                    raise _fail(
                        f"variant name {desc.name!r} does not match its annotation or repeats",
                        self._at(what),
                    )
                self.variants.append(desc.name)
            elif info is not None:
                raise _fail("a second bundle manifest", self._at(what))
            else:
                info = parse_model(BundleInfo, data, where=self._at(f"{what} config"))
            for j, layer in enumerate(m.layers):
                lw = f"{what} layer {j} ({layer.annotation(ANN_TITLE) or layer.digest})"
                if layer.media_type not in LAYER_TYPES:
                    raise _fail(f"unknown layer media type {layer.media_type!r}", self._at(lw))
                if layer.size > MAX_BLOB_BYTES:
                    raise _fail(
                        f"declared size {layer.size} bytes is over the {MAX_BLOB_BYTES}-byte limit",
                        self._at(lw),
                    )
                self.r.check_blob_present(layer, what=lw)
                layers.setdefault(layer.digest, (layer, lw))
        if info is None:
            raise _fail("the bundle index lists no bundle manifest", self.where)
        if (info.name, info.version, sorted(info.variants)) != (
            name,
            version,
            sorted(self.variants),
        ):
            raise _fail(
                f"bundle config says {info.name}:{info.version} with {info.variants}; the index "
                f"says {name}:{version} with {self.variants}",
                self.where,
            )
        return layers

    def _signatures(
        self, descs: list[Descriptor], bundle: Descriptor, name: str, version: str
    ) -> list[str]:
        """Every signature manifest in index.json goes through the one chain of trust (trust.py)."""

        def candidate(d: Descriptor) -> SignatureCandidate:
            what = self._at(f"signature manifest {d.digest}")
            m = self._manifest(d, f"signature manifest {d.digest}", ARTIFACT_SIGNATURE)
            layer = m.layers[0] if len(m.layers) == 1 else None

            def read_layer() -> bytes:
                assert layer is not None  # trust.py checked there is exactly one
                return self.r.read_blob(layer, MAX_SIGNATURE_BYTES, what=f"{what} layer")

            return SignatureCandidate(what, m, read_layer)

        return verify_signatures(
            (candidate(d) for d in descs),
            bundle.digest,
            name,
            version,
            self.keys,
            where=self.where,
            require=self.require,
        )
