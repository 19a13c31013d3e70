"""Verify an adapter artifact: structure, signature, bytes, and that its LoRA fits its base.

One chain of trust for `slmops verify` (an adapter folder) and the edge agent (an adapter
fetched from the registry), like bundle/trust.py for bundles:

    trusted key -> signature payload names the adapter index digest, name, version
    adapter digest = sha256(adapter index bytes) -> subject (base bundle) and one manifest
    sha256(manifest bytes) -> AdapterDescriptor config, adapter.gguf and the other layers
    descriptor.base.bundle_digest == the index's subject digest
    adapter.gguf's header: complete LoRA pairs of one rank == the descriptor's rank and shapes

`verify_adapter_metadata` checks everything but the layer bytes (a few KB), so the agent
refuses an unsigned or foreign adapter before downloading it; `check_adapter_gguf` reads the
downloaded GGUF's header against the descriptor and, on a device, against the running base.

Agent-safe: the standard library, cryptography, pydantic and slmops.core/protocol/bundle only.
"""

from __future__ import annotations

import functools
import json
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops.bundle.adapter_gguf import (
    GgufHeader,
    GgufHeaderError,
    lora_pairs,
    parse_header,
    shape_mismatches,
)
from slmops.bundle.adapter_meta import ADAPTER_FILE, AdapterDescriptor
from slmops.bundle.layout import (
    BundleFormatError,
    Descriptor,
    Index,
    LayoutReader,
    Manifest,
    parse_model,
)
from slmops.bundle.media import (
    ANN_BUNDLE_NAME,
    ANN_TITLE,
    ANN_VERSION,
    ARTIFACT_ADAPTER,
    LAYER_TYPES,
    MAX_BLOB_BYTES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MT_ADAPTER_CONFIG,
    MT_INDEX,
    MT_LORA_GGUF,
    MT_MANIFEST,
)
from slmops.bundle.signing import MAX_SIGNATURE_BYTES
from slmops.bundle.trust import SignatureCandidate, verify_signatures
from slmops.bundle.verify import VerifyResult  # verify.py imports this module lazily
from slmops.core.digest import sha256_bytes

HINT = "do not deploy it; build it again with `slmops bundle-adapter` or fetch it again"


def _fail(message: str, where: str, hint: str = HINT) -> BundleFormatError:
    return BundleFormatError(message, where=where, hint=hint)


@dataclass(frozen=True)
class VerifiedAdapter:
    digest: str  # the adapter index digest (what is signed)
    name: str
    version: str
    manifest_digest: str
    descriptor: AdapterDescriptor
    gguf: Descriptor  # the adapter.gguf layer
    layers: list[Descriptor]
    signed_by: list[str] = field(default_factory=list)


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"{what} is not valid JSON: {exc}", what) from None


def is_adapter_index(data: bytes) -> bool:
    """Whether root index bytes are an adapter's (cheap; everything is checked later)."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and obj.get("artifactType") == ARTIFACT_ADAPTER


def verify_adapter_metadata(
    index_bytes: bytes,
    digest: str,
    signatures: Sequence[tuple[bytes, bytes]],
    manifest_bytes: bytes,
    config_bytes: bytes,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    require_signature: bool = True,
) -> VerifiedAdapter:
    """Every check but the layer bytes; `signatures` holds (manifest, layer) byte pairs."""
    if sha256_bytes(index_bytes) != digest:
        raise _fail(f"adapter index bytes hash to {sha256_bytes(index_bytes)}", digest)
    what = f"adapter index {digest}"
    index = parse_model(Index, _json(index_bytes, what), where=what)
    name, version = index.annotation(ANN_BUNDLE_NAME), index.annotation(ANN_VERSION)
    if index.media_type != MT_INDEX or index.artifact_type != ARTIFACT_ADAPTER:
        raise _fail(
            f"artifactType {index.artifact_type!r}, expected {ARTIFACT_ADAPTER}",
            what,
            "this is not an adapter artifact (a model bundle is installed, not loaded on top)",
        )
    if not name or not version:
        raise _fail("the adapter index lacks its name or version annotation", what)
    if index.subject is None or index.subject.media_type != MT_INDEX:
        raise _fail("the adapter index has no subject (the base bundle index)", what)
    candidates = []
    for raw, layer in signatures:
        sw = f"signature manifest {sha256_bytes(raw)}"
        m = parse_model(Manifest, _json(raw, sw), where=sw)
        candidates.append(SignatureCandidate(sw, m, functools.partial(bytes, layer)))
    signed_by = verify_signatures(
        candidates,
        digest,
        name,
        version,
        keys,
        where=f"{name}:{version}",
        require=require_signature,
    )
    if len(index.manifests) != 1:
        raise _fail(f"the adapter index lists {len(index.manifests)} manifests, not 1", what)
    entry = index.manifests[0]
    if entry.media_type != MT_MANIFEST or entry.artifact_type not in (None, ARTIFACT_ADAPTER):
        raise _fail(f"manifest entry {entry.media_type} / {entry.artifact_type}", what)
    if sha256_bytes(manifest_bytes) != entry.digest or len(manifest_bytes) != entry.size:
        raise _fail(f"adapter manifest does not match its digest {entry.digest}", what)
    mw = f"adapter manifest {entry.digest}"
    m = parse_model(Manifest, _json(manifest_bytes, mw), where=mw)
    if m.artifact_type != ARTIFACT_ADAPTER or m.config.media_type != MT_ADAPTER_CONFIG:
        raise _fail(f"artifactType {m.artifact_type!r} / config {m.config.media_type!r}", mw)
    if sha256_bytes(config_bytes) != m.config.digest or len(config_bytes) != m.config.size:
        raise _fail("adapter config does not match its digest", mw)
    desc = parse_model(AdapterDescriptor, _json(config_bytes, "config"), where=f"{mw} config")
    if (desc.name, desc.version) != (name, version):
        raise _fail(f"config names {desc.name}:{desc.version}, index {name}:{version}", mw)
    if desc.base.bundle_digest != index.subject.digest:
        raise _fail(
            f"config names base {desc.base.bundle_digest}, subject is {index.subject.digest}", mw
        )
    ggufs = [x for x in m.layers if x.media_type == MT_LORA_GGUF]
    for x in m.layers:
        if x.media_type not in LAYER_TYPES or x.size > MAX_BLOB_BYTES:
            raise _fail(f"layer {x.digest}: unknown media type or size", mw)
    if len(ggufs) != 1 or ggufs[0].annotation(ANN_TITLE) != ADAPTER_FILE:
        raise _fail(f"expected one {MT_LORA_GGUF} layer titled {ADAPTER_FILE}", mw)
    if ggufs[0].size != desc.disk_bytes:
        raise _fail(f"adapter.gguf is {ggufs[0].size} bytes, config says {desc.disk_bytes}", mw)
    return VerifiedAdapter(
        digest, name, version, entry.digest, desc, ggufs[0], list(m.layers), signed_by
    )


def check_adapter_gguf(
    fh: BinaryIO, desc: AdapterDescriptor, where: str, base: GgufHeader | None = None
) -> GgufHeader:
    """The GGUF LoRA's header against the descriptor (rank, shapes, architecture) and, given
    the header of the GGUF it will be applied to, against that base's tensor shapes."""
    try:
        header = parse_header(fh, where)
        if header.metadata.get("general.type") != "adapter":
            raise GgufHeaderError("the GGUF file is not an adapter (general.type)", where=where)
        shapes, rank = lora_pairs(header, where)
    except GgufHeaderError as exc:
        raise _fail(exc.message, exc.where or where) from None
    if rank != desc.rank:
        raise _fail(f"LoRA rank {rank}, the descriptor says {desc.rank}", where)
    if {k: list(v) for k, v in shapes.items()} != desc.shapes:
        raise _fail("the LoRA tensors differ from the shapes the descriptor lists", where)
    if header.architecture != desc.architecture:
        raise _fail(f"architecture {header.architecture}, descriptor {desc.architecture}", where)
    if base is not None:
        if base.architecture != desc.architecture:
            raise _fail(
                f"the base is a {base.architecture} model, the adapter is for {desc.architecture}",
                where,
                "assign the adapter only to devices running the base it was trained on",
            )
        problems = shape_mismatches(shapes, base)
        if problems:
            raise _fail(
                "the adapter does not fit the base: " + "; ".join(problems),
                where,
                "assign the adapter only to devices running the base it was trained on",
            )
    return header


@dataclass(frozen=True)
class AdapterVerifyResult(VerifyResult):
    """`slmops verify` on an adapter: `variants` are the base variants it fits."""

    kind: str = "adapter"
    base: str = ""  # NAME:VERSION@DIGEST of the base bundle


OnBlob = Callable[[str, int], None]


def verify_adapter_layout(
    reader: LayoutReader,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    require_signature: bool = True,
    on_blob: OnBlob | None = None,
) -> tuple[AdapterVerifyResult, VerifiedAdapter]:
    """An adapter folder or tar: every check, every byte, the GGUF header last."""
    reader.read_layout_version()
    top = reader.read_index()
    roots = [d for d in top.manifests if d.media_type == MT_INDEX]
    if len(roots) != 1:
        raise _fail(f"index.json lists {len(roots)} indexes; an adapter has one", reader.where)
    root = roots[0]
    index_bytes = reader.read_blob(root, MAX_MANIFEST_BYTES, what="adapter index")
    index = parse_model(Index, _json(index_bytes, "adapter index"), where=reader.where)
    if len(index.manifests) != 1:
        raise _fail(f"the adapter index lists {len(index.manifests)} manifests", reader.where)
    manifest_bytes = reader.read_blob(
        index.manifests[0], MAX_MANIFEST_BYTES, what="adapter manifest"
    )
    m = parse_model(Manifest, _json(manifest_bytes, "adapter manifest"), where=reader.where)
    config = reader.read_blob(m.config, MAX_CONFIG_BYTES, what="adapter config")
    signatures: list[tuple[bytes, bytes]] = []
    for d in top.manifests:
        if d.media_type != MT_MANIFEST:
            continue
        raw = reader.read_blob(d, MAX_MANIFEST_BYTES, what=f"signature manifest {d.digest}")
        sig = parse_model(Manifest, _json(raw, d.digest), where=d.digest)
        sig_layer = b""
        if len(sig.layers) == 1 and sig.layers[0].size <= MAX_SIGNATURE_BYTES:
            sig_layer = reader.read_blob(
                sig.layers[0], MAX_SIGNATURE_BYTES, what=f"{d.digest} layer"
            )
        signatures.append((raw, sig_layer))
    verified = verify_adapter_metadata(
        index_bytes,
        root.digest,
        signatures,
        manifest_bytes,
        config,
        keys,
        require_signature=require_signature,
    )
    total = 0
    for layer in verified.layers:
        what = f"adapter layer {layer.annotation(ANN_TITLE) or layer.digest}"
        if on_blob is not None:
            on_blob(what, layer.size)
        reader.verify_blob(layer, what=what)
        total += layer.size
    try:
        with reader.open_blob(verified.gguf.digest) as fh:
            check_adapter_gguf(fh, verified.descriptor, f"{reader.where}: {ADAPTER_FILE}")
    except tarfile.TarError as exc:
        raise _fail(f"corrupt tarball: {exc}", reader.where) from None
    base = verified.descriptor.base
    result = AdapterVerifyResult(
        verified.digest,
        verified.name,
        verified.version,
        [v.name for v in verified.descriptor.variants],
        verified.signed_by,
        total,
        base=f"{base.name}:{base.version}@{base.bundle_digest}",
    )
    return result, verified


def root_is_adapter(reader: LayoutReader) -> bool:
    """Whether a layout's single root index is an adapter's (False when it cannot tell)."""
    try:
        roots = [d for d in reader.read_index().manifests if d.media_type == MT_INDEX]
        if len(roots) != 1:
            return False
        return is_adapter_index(reader.read_blob(roots[0], MAX_MANIFEST_BYTES, what="index"))
    except (BundleFormatError, OSError):
        return False


def adapter_file(path: Path) -> Path:
    """Where a verified adapter's GGUF is in an installed slot (one fixed name)."""
    return Path(path) / ADAPTER_FILE
