"""`slmops bundle-adapter`: an adapter folder as its own OCI artifact whose subject is the base.

A fleet runs one base bundle everywhere and a small LoRA per site; shipping the adapter alone
is what makes a site's update cost its adapter's bytes instead of the model's. The artifact is
an OCI image layout shaped like a bundle (so `slmops sign`, `verify`, `push`, `pull` and the
control plane's registry take it as they are): the root index has artifactType ADAPTER, names
itself (name, version) and has `subject` = the base bundle index; its one manifest holds the
`AdapterDescriptor` config and three layers: adapter.gguf, the adapter's lineage card and its
evaluation.

Before anything is written, the adapter must fit the base, for each GGUF variant listed:
- lineage: the Hugging Face model the adapter trained on is in the variant's lineage card;
- shapes: every LoRA pair of adapter.gguf targets a tensor of the variant's GGUF with the same
  dims, and all pairs have one rank (read from the GGUF headers; no weights are loaded);
- runtime: the variant is a GGUF (llama.cpp); ONNX variants cannot take a GGUF LoRA.
A variant that fails is left out with its reason; none fitting is an error (exit 2).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slmops.bundle.adapter_gguf import (
    GgufHeaderError,
    lora_pairs,
    parse_header,
    read_header,
    shape_mismatches,
)
from slmops.bundle.adapter_meta import (
    ADAPTER_FILE,
    ANN_ADAPTER_BASE,
    AdapterBase,
    AdapterDescriptor,
    AdapterVariant,
)
from slmops.bundle.layout import (
    BundleFormatError,
    Descriptor,
    Index,
    LayoutReader,
    Manifest,
    OciLayout,
    parse_model,
)
from slmops.bundle.media import (
    ANN_BUNDLE_NAME,
    ANN_CREATED,
    ANN_KEY_FINGERPRINT,
    ANN_REF_NAME,
    ANN_TITLE,
    ANN_VARIANT,
    ANN_VERSION,
    ARTIFACT_ADAPTER,
    ARTIFACT_SIGNATURE,
    ARTIFACT_VARIANT,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MT_ADAPTER_CONFIG,
    MT_CARD,
    MT_FILE,
    MT_INDEX,
    MT_LORA_GGUF,
    MT_MANIFEST,
    MT_WEIGHTS_GGUF,
)
from slmops.bundle.oci_ref import _REPO_RE, _TAG_RE
from slmops.core.atomic import atomic_directory
from slmops.core.errors import UserInputError
from slmops.protocol.bundle import VariantDescriptor

CARD_FILE = "slmops-card.json"
EVAL_FILE = "evaluation.json"
EVAL_KEYS = ("site_perplexity_base", "site_perplexity_adapted", "general_kld_to_base")


@dataclass
class AdapterBundleResult:
    path: Path
    digest: str
    name: str
    version: str
    base: str
    variants: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it does not fit
    adapter_bytes: int = 0


def _bad(message: str, where: object, hint: str) -> UserInputError:
    return UserInputError(message, where=str(where), hint=hint)


def _read_adapter_dir(adapter_dir: Path) -> tuple[Path, dict[str, object], str | None]:
    """(adapter.gguf, its card as JSON, the HF base digest it trained on)."""
    gguf, card = adapter_dir / ADAPTER_FILE, adapter_dir / CARD_FILE
    if not gguf.is_file() or not card.is_file():
        raise _bad(
            f"not an adapter folder (needs {ADAPTER_FILE} and {CARD_FILE})",
            adapter_dir,
            "pass the --out folder of `slmops adapt`",
        )
    try:
        doc = json.loads(card.read_text())
        chain = doc.get("chain") or []
        base_digest = chain[-1].get("input_digest") if chain else None
    except (ValueError, AttributeError, OSError) as exc:
        raise _bad(f"unreadable adapter card: {exc}", card, "run `slmops adapt` again") from None
    if doc.get("format") != "lora-adapter":
        raise _bad(
            f"card format {doc.get('format')!r}, not lora-adapter",
            card,
            "pass the --out folder of `slmops adapt`",
        )
    return gguf, doc, base_digest


def _lineage(card: dict[str, object]) -> set[str]:
    chain = card.get("chain") or []
    found = {str(card.get("origin_digest"))}
    if isinstance(chain, list):
        found |= {str(s.get("input_digest")) for s in chain if isinstance(s, dict)}
    return found


def _fits(
    base: OciLayout,
    entry: Descriptor,
    shapes: dict[str, tuple[int, ...]],
    arch: str | None,
    trained_on: str | None,
) -> tuple[AdapterVariant | None, str]:
    """The variant as an AdapterVariant when the adapter fits it, else None and why not."""
    m = parse_model(
        Manifest, base.read_json(entry, MAX_MANIFEST_BYTES, what=entry.digest), where=entry.digest
    )
    desc = parse_model(
        VariantDescriptor,
        base.read_json(m.config, MAX_CONFIG_BYTES, what=f"{entry.digest} config"),
        where=f"{entry.digest} config",
    )
    weights = [x for x in m.layers if x.media_type == MT_WEIGHTS_GGUF]
    if desc.format != "gguf" or len(weights) != 1:
        return None, f"{desc.runtime} ({desc.format}) cannot load a GGUF LoRA adapter"
    cards = [
        x for x in m.layers if x.media_type == MT_CARD and x.annotation(ANN_TITLE) == CARD_FILE
    ]
    if trained_on and cards:
        card = base.read_json(cards[0], MAX_CONFIG_BYTES, what=f"{desc.name} card")
        if isinstance(card, dict) and trained_on not in _lineage(card):
            return None, (
                f"made from another model (its lineage does not include {trained_on[:19]}..., "
                "the model the adapter was trained on)"
            )
    base.check_blob_present(weights[0], what=f"{desc.name} weights")
    try:
        with base.open_blob(weights[0].digest) as fh:
            header = parse_header(fh, f"{desc.name} weights")
    except GgufHeaderError as exc:
        return None, exc.message
    if header.architecture != arch:
        return None, f"a {header.architecture} model; the adapter is for {arch}"
    problems = shape_mismatches(shapes, header)
    if problems:
        return None, "shapes differ: " + "; ".join(problems)
    return (
        AdapterVariant(
            name=desc.name,
            manifest_digest=entry.digest,
            gguf_digest=weights[0].digest,
            gguf_bytes=weights[0].size,
        ),
        "",
    )


def _base_layout(base: str | Path, token: str | None, scratch: Path) -> Path:
    """A local layout of the base bundle: the folder itself, or pulled from an oci:// ref."""
    if str(base).startswith("oci://"):
        from slmops.bundle.registry import pull

        pull(str(base), scratch / "base", token=token)
        return scratch / "base"
    path = Path(base)
    if not (path / "index.json").is_file():
        raise _bad(
            "the base is not a bundle folder",
            path,
            "pass the base bundle's folder (from `slmops bundle`) or its oci:// reference",
        )
    return path


def build_adapter_bundle(
    adapter_dir: Path,
    base: str | Path,
    *,
    name: str,
    version: str,
    out: Path,
    variants: list[str] | None = None,
    token: str | None = None,
    created: str | None = None,
) -> AdapterBundleResult:
    """Check that the adapter fits the base, then write the adapter artifact at `out`."""
    if not _REPO_RE.match(name) or len(name) > 255:
        raise _bad(f"invalid adapter name {name!r}", "--name", "lowercase letters, digits, . _ - /")
    if not _TAG_RE.match(version):
        raise _bad(f"invalid version {version!r}", "--version", "e.g. 1.0.0")
    if out.exists() and any(out.iterdir()):
        raise _bad("output folder exists and is not empty", out, "choose a new --out folder")
    gguf, _card, trained_on = _read_adapter_dir(Path(adapter_dir))
    try:
        header = read_header(gguf)
        if header.metadata.get("general.type") != "adapter":
            raise GgufHeaderError("the GGUF file is not an adapter (general.type)", where=gguf)
        shapes, rank = lora_pairs(header, str(gguf))
    except GgufHeaderError as exc:
        raise _bad(
            f"corrupt adapter file: {exc.message}", gguf, "run `slmops adapt` again"
        ) from None
    arch = header.architecture
    with tempfile.TemporaryDirectory(prefix="slmops-adapter-") as scratch:
        layout = OciLayout(_base_layout(base, token, Path(scratch)))
        layout.read_layout_version()
        roots = [d for d in layout.read_index().manifests if d.media_type == MT_INDEX]
        if len(roots) != 1:
            raise _bad("the base holds no single bundle index", layout.where, "pass one bundle")
        root = roots[0]
        index = parse_model(
            Index, layout.read_json(root, MAX_MANIFEST_BYTES, what="base index"), where="base"
        )
        base_name, base_version = index.annotation(ANN_BUNDLE_NAME), index.annotation(ANN_VERSION)
        if index.artifact_type == ARTIFACT_ADAPTER or not base_name or not base_version:
            raise _bad("the base is not a model bundle", layout.where, "pass the base bundle")
        fitting: list[AdapterVariant] = []
        skipped: dict[str, str] = {}
        for entry in index.manifests:
            vname = entry.annotation(ANN_VARIANT)
            if entry.artifact_type != ARTIFACT_VARIANT or not vname:
                continue
            if variants and vname not in variants:
                continue
            fit, why = _fits(layout, entry, shapes, arch, trained_on)
            if fit is None:
                skipped[vname] = why
            else:
                fitting.append(fit)
        missing = sorted(set(variants or []) - {v.name for v in fitting} - set(skipped))
        if missing:
            raise _bad(f"the base has no variant {', '.join(missing)}", "--variant", "see inspect")
        if not fitting or (variants and skipped):
            reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no GGUF variant"
            raise _bad(
                f"the adapter does not fit {base_name}:{base_version} ({reasons})",
                adapter_dir,
                "an adapter ships only on the base it was trained on: pass that base's bundle, "
                "or train the adapter on this base with `slmops adapt`",
            )
        evaluation = card_eval(Path(adapter_dir))
        alpha = header.metadata.get("adapter.lora.alpha")
        descriptor = AdapterDescriptor(
            name=name,
            version=version,
            base=AdapterBase(name=base_name, version=base_version, bundle_digest=root.digest),
            variants=fitting,
            architecture=arch or "unknown",
            rank=rank,
            alpha=float(alpha) if isinstance(alpha, int | float) else None,
            shapes={k: list(v) for k, v in shapes.items()},
            disk_bytes=gguf.stat().st_size,
            base_model_digest=trained_on,
            evaluation=evaluation,
        )
        created = created or datetime.now(UTC).isoformat()
        subject = Descriptor(media_type=MT_INDEX, digest=root.digest, size=root.size)
        with atomic_directory(Path(out), replace=True) as tmp:
            digest = _write(OciLayout.init(tmp), Path(adapter_dir), descriptor, subject, created)
    return AdapterBundleResult(
        Path(out),
        digest,
        name,
        version,
        f"{base_name}:{base_version}@{root.digest}",
        [v.name for v in fitting],
        skipped,
        descriptor.disk_bytes,
    )


def card_eval(adapter_dir: Path) -> dict[str, float | int | str | bool | None]:
    """The adapter's headline evaluation figures (site perplexity, forgetting), if recorded."""
    try:
        doc = json.loads((adapter_dir / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: doc[k] for k in EVAL_KEYS if isinstance(doc, dict) and k in doc}


def _write(
    layout: OciLayout, src: Path, desc: AdapterDescriptor, subject: Descriptor, created: str
) -> str:
    layers = [
        layout.put_file(src / ADAPTER_FILE, MT_LORA_GGUF, annotations={ANN_TITLE: ADAPTER_FILE}),
        layout.put_file(src / CARD_FILE, MT_CARD, annotations={ANN_TITLE: CARD_FILE}),
    ]
    if (src / EVAL_FILE).is_file():
        layers.append(layout.put_file(src / EVAL_FILE, MT_FILE, annotations={ANN_TITLE: EVAL_FILE}))
    config = layout.put_json(desc.model_dump(mode="json", by_alias=True), MT_ADAPTER_CONFIG)
    manifest = Manifest(
        media_type=MT_MANIFEST, artifact_type=ARTIFACT_ADAPTER, config=config, layers=layers
    )
    entry = layout.put_json(manifest.to_oci(), MT_MANIFEST, artifact_type=ARTIFACT_ADAPTER)
    notes = {
        ANN_BUNDLE_NAME: desc.name,
        ANN_VERSION: desc.version,
        ANN_CREATED: created,
        ANN_ADAPTER_BASE: f"{desc.base.name}:{desc.base.version}",
    }
    index = Index(
        artifact_type=ARTIFACT_ADAPTER, manifests=[entry], subject=subject, annotations=notes
    )
    root = layout.put_json(
        index.to_oci(),
        MT_INDEX,
        artifact_type=ARTIFACT_ADAPTER,
        annotations={ANN_REF_NAME: desc.version, ANN_BUNDLE_NAME: desc.name},
    )
    layout.write_index(Index(manifests=[root]))
    return root.digest


def inspect_adapter(
    reader: LayoutReader, top: Index, root: Descriptor, index: Index, path: Path
) -> dict[str, Any]:
    """`slmops inspect` of an adapter artifact: what it is for, its files, who signed it (not
    verified here, as for bundles)."""
    from slmops.bundle.inspect import UNVERIFIED_NOTE

    if len(index.manifests) != 1:
        raise BundleFormatError("an adapter index lists one manifest", where=str(path))
    entry = index.manifests[0]
    m = parse_model(
        Manifest, reader.read_json(entry, MAX_MANIFEST_BYTES, what=entry.digest), where=entry.digest
    )
    desc = parse_model(
        AdapterDescriptor,
        reader.read_json(m.config, MAX_CONFIG_BYTES, what="adapter config"),
        where=f"{path}: adapter config",
    )
    signatures = []
    for d in top.manifests:
        if d.media_type != MT_MANIFEST:
            continue
        sig = parse_model(
            Manifest, reader.read_json(d, MAX_MANIFEST_BYTES, what=d.digest), where=d.digest
        )
        if sig.artifact_type == ARTIFACT_SIGNATURE:
            notes = sig.annotations or {}
            signatures.append(
                {
                    "key": notes.get(ANN_KEY_FINGERPRINT),
                    "signed_at": notes.get(ANN_CREATED),
                    "manifest_digest": d.digest,
                    "covers_this_bundle": sig.subject is not None
                    and sig.subject.digest == root.digest,
                }
            )
    files = [
        {"title": x.annotation(ANN_TITLE), "media_type": x.media_type, "size": x.size}
        for x in m.layers
    ]
    return {
        "kind": "adapter",
        "path": str(path),
        "name": desc.name,
        "version": desc.version,
        "created": index.annotation(ANN_CREATED),
        "digest": root.digest,
        "subject": index.subject.digest if index.subject else None,
        "base": desc.base.model_dump(mode="json"),
        "fits_variants": [v.model_dump(mode="json") for v in desc.variants],
        "rank": desc.rank,
        "alpha": desc.alpha,
        "architecture": desc.architecture,
        "target_tensors": len(desc.shapes),
        "adapter_bytes": desc.disk_bytes,
        "evaluation": desc.evaluation,
        "files": files,
        "signed_by": [s["key"] for s in signatures if s["covers_this_bundle"]],
        "signatures": signatures,
        "signatures_verified": False,
        "note": UNVERIFIED_NOTE,
        "total_bytes": root.size + entry.size + m.config.size + sum(x.size for x in m.layers),
    }
