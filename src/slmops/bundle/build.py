"""Build a bundle: one model version, every deployable variant, its cards and its eval report.

Layout (see media.py): each variant is an OCI image manifest whose config is a
`VariantDescriptor` (what a device matches against its hardware) and whose layers are the
variant's files, typed by media type; a bundle manifest carries `BundleInfo` and the report; the
bundle index ties them together and its digest is THE bundle digest, the thing a signature
covers. Blobs are addressed by content, so a tokenizer shared by ten variants is stored once.

The bundle must be exactly what was evaluated: the files of each variant are hashed while they
are stored and compared with the digest in the report (or card), and a report variant missing
from the folder is an error, not a silent omission. Building is deterministic (canonical JSON,
`created` from the report) so identical inputs give an identical digest, which is what lets a
rebuild of the same name+version succeed and a different one be refused.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from slmops import __version__
from slmops.bundle.layout import BLOBS_DIR, Descriptor, Index, Manifest, OciLayout, parse_model
from slmops.bundle.media import (
    ANN_BUNDLE_NAME,
    ANN_CREATED,
    ANN_REF_NAME,
    ANN_TITLE,
    ANN_VARIANT,
    ANN_VERSION,
    ARTIFACT_BUNDLE,
    ARTIFACT_VARIANT,
    MAX_MANIFEST_BYTES,
    MT_BUNDLE_CONFIG,
    MT_INDEX,
    MT_MANIFEST,
    MT_PNG,
    MT_REPORT_HTML,
    MT_REPORT_JSON,
    MT_REPORT_MD,
    MT_VARIANT_CONFIG,
    layer_media_type,
)
from slmops.bundle.tarball import open_bundle, write_tar
from slmops.core.atomic import TMP_PREFIX, fsync_tree
from slmops.core.digest import METADATA_FILES, sha256_json
from slmops.core.errors import ConfigError, ResourceError, SlmopsError, UserInputError
from slmops.evaluate.gate import load_report
from slmops.evaluate.schema import EvalReport
from slmops.model.card import LineageCard
from slmops.model.variants import DEPLOYABLE, FoundVariant, discover_variants
from slmops.protocol.bundle import BundleInfo, VariantDescriptor

# OCI distribution repository names; semver 2.0.0 (the regex from semver.org).
NAME_RE = re.compile(
    r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*\Z"
)
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z"
)
REPORT_LAYERS = (
    ("report.json", MT_REPORT_JSON),
    ("report.html", MT_REPORT_HTML),
    ("report.md", MT_REPORT_MD),
)
OnFile = Callable[[str, int], None]  # (file being stored, its size): drives a progress bar


@dataclass(frozen=True)
class BuildResult:
    path: Path
    digest: str  # the bundle index digest: what a signature covers
    name: str
    version: str
    format: str
    variants: list[str]
    created: str
    stored_bytes: int  # unique blob bytes (identical files are stored once)
    unchanged: bool  # `out` already held this exact bundle; nothing was written


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or len(name) > 255:
        raise ConfigError(
            f"bundle name {name!r} is not a valid OCI repository name",
            where="--name",
            hint="use lowercase letters, digits and . _ - separators, e.g. 'acme/support-bot'",
        )
    return name


def check_version(version: str) -> str:
    if not SEMVER_RE.match(version):
        raise ConfigError(
            f"version {version!r} is not semantic versioning (MAJOR.MINOR.PATCH)",
            where="--version",
            hint="use e.g. 1.2.0, 1.3.0-rc.1 or 1.3.0+build.7",
        )
    return version


def build_bundle(
    variants_dir: Path,
    report_dir: Path | None,
    *,
    name: str,
    version: str,
    out: Path,
    format: str = "layout",
    created: str | None = None,
    on_file: OnFile | None = None,
) -> BuildResult:
    """Write the bundle to `out` (a layout directory or a .tar) atomically and return its digest."""
    check_name(name)
    check_version(version)
    if format not in ("layout", "tar"):
        raise ConfigError(
            f"unknown bundle format {format!r}", where="--format", hint="use layout or tar"
        )
    report = load_report(report_dir) if report_dir is not None else None
    variants = _select_variants(Path(variants_dir), report)
    created = created or (report.created_at if report else max(v.card.created_at for v in variants))
    existing = _existing_bundle(out)
    if existing and existing[:2] != (name, version):
        raise UserInputError(
            f"already holds bundle {existing[0]}:{existing[1]}; refusing to replace it with "
            f"{name}:{version}",
            where=out,
            hint="write each version to its own --out path",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
    try:
        layout = OciLayout.init(work / "layout")
        digest = _write(layout, variants, report, report_dir, name, version, created, on_file)
        stored = sum(p.stat().st_size for p in (layout.root / BLOBS_DIR).iterdir())
        result = BuildResult(
            out, digest, name, version, format, [v.name for v in variants], created, stored, False
        )
        if existing:
            if existing[2] != digest:
                raise UserInputError(
                    f"{name}:{version} already exists with digest {existing[2]}; these inputs give "
                    f"{digest}. A version names one content",
                    where=out,
                    hint="bump --version (semver) for new content, or rebuild from the same inputs",
                )
            return replace(result, unchanged=True)
        if format == "layout":
            fsync_tree(layout.root)
            if out.is_dir():
                out.rmdir()  # _existing_bundle allowed only an empty directory here
            os.replace(layout.root, out)
        else:
            write_tar(layout.root, out)
        return result
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ResourceError(
                "no space left on device", where=out, hint="free disk space"
            ) from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _select_variants(variants_dir: Path, report: EvalReport | None) -> list[FoundVariant]:
    """Exactly the evaluated variants when there is a report, else every deployable one."""
    found = {v.name: v for v in discover_variants(variants_dir)}
    if report is None or not report.variants:
        return list(found.values())
    missing = [v.name for v in report.variants if v.name not in found]
    if missing:
        raise ConfigError(
            f"variant(s) {', '.join(missing)} are in the evaluation report but not among the "
            f"deployable variants of this folder (found: {', '.join(found) or 'none'})",
            where=variants_dir,
            hint="pass the VARIANTS_DIR that was evaluated, or re-run `slmops evaluate` on this one",
        )
    return [found[v.name] for v in report.variants]


def _existing_bundle(out: Path) -> tuple[str, str, str] | None:
    """(name, version, digest) of the bundle already at `out`; None if `out` is free."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        with open_bundle(out) as reader:
            reader.read_layout_version()
            top = reader.read_index()
            desc = next(d for d in top.manifests if d.media_type == MT_INDEX)
            data = reader.read_json(desc, MAX_MANIFEST_BYTES, what="bundle index")
            index = parse_model(Index, data, where=f"{out}: bundle index")
    except (SlmopsError, StopIteration) as exc:
        detail = exc.message if isinstance(exc, SlmopsError) else "no bundle index"
        raise UserInputError(
            f"exists and is not a readable slmops bundle ({detail})",
            where=out,
            hint="choose a new --out path, or remove this one",
        ) from None
    return (
        index.annotation(ANN_BUNDLE_NAME) or "",
        index.annotation(ANN_VERSION) or "",
        desc.digest,
    )


def _write(
    layout: OciLayout,
    variants: list[FoundVariant],
    report: EvalReport | None,
    report_dir: Path | None,
    name: str,
    version: str,
    created: str,
    on_file: OnFile | None,
) -> str:
    entries = [_put_variant(layout, v, report, on_file) for v in variants]
    layers: list[Descriptor] = []
    if report_dir is not None:
        files = [(n, mt) for n, mt in REPORT_LAYERS if (report_dir / n).is_file()]
        charts = report_dir / "charts"
        if charts.is_dir():
            files += [(f"charts/{p.name}", MT_PNG) for p in sorted(charts.glob("*.png"))]
        for title, mt in files:
            layers.append(layout.put_file(report_dir / title, mt, annotations={ANN_TITLE: title}))
    origins = {v.card.origin_digest for v in variants}
    info = BundleInfo(
        name=name,
        version=version,
        created_at=created,
        origin_digest=origins.pop() if len(origins) == 1 else None,
        variants=[v.name for v in variants],
        selection={s.profile: s.variant for s in report.selections} if report else {},
        slmops_version=__version__,
    )
    config = layout.put_json(info.model_dump(mode="json", by_alias=True), MT_BUNDLE_CONFIG)
    manifest = Manifest(
        media_type=MT_MANIFEST, artifact_type=ARTIFACT_BUNDLE, config=config, layers=layers
    )
    bundle_manifest = layout.put_json(manifest.to_oci(), MT_MANIFEST, artifact_type=ARTIFACT_BUNDLE)
    annotations = {ANN_BUNDLE_NAME: name, ANN_VERSION: version, ANN_CREATED: created}
    index = Index(
        artifact_type=ARTIFACT_BUNDLE,
        manifests=[*entries, bundle_manifest],
        annotations=annotations,
    )
    desc = layout.put_json(
        index.to_oci(),
        MT_INDEX,
        artifact_type=ARTIFACT_BUNDLE,
        annotations={ANN_REF_NAME: version, ANN_BUNDLE_NAME: name},
    )
    layout.write_index(Index(manifests=[desc]))
    return desc.digest


def _put_variant(
    layout: OciLayout, v: FoundVariant, report: EvalReport | None, on_file: OnFile | None
) -> Descriptor:
    files = sorted(
        (p for p in v.path.rglob("*") if p.is_file() and not p.name.startswith(TMP_PREFIX)),
        key=lambda p: p.relative_to(v.path).as_posix(),
    )
    layers = []
    for p in files:
        rel = p.relative_to(v.path).as_posix()
        if on_file is not None:
            on_file(f"{v.name}/{rel}", p.stat().st_size)
        layers.append(layout.put_file(p, layer_media_type(rel), annotations={ANN_TITLE: rel}))
    # The same tree digest as core.digest.tree_digest, from the hashes just computed.
    tree = sha256_json(
        [
            (f.relative_to(v.path).as_posix(), d.digest)
            for f, d in zip(files, layers, strict=True)
            if f.name not in METADATA_FILES
        ]
    )
    info = next((i for i in report.variants if i.name == v.name), None) if report else None
    expected = info.digest if info else v.card.digest
    if tree != expected:
        raise ConfigError(
            f"variant {v.name!r} is not the one {'evaluated' if info else 'its card describes'}: "
            f"its files hash to {tree}, the {'report' if info else 'card'} says {expected}",
            where=v.path,
            hint="restore the variant's files, or re-run `slmops evaluate` on the current ones",
        )
    card_digest = next(
        (
            d.digest
            for f, d in zip(files, layers, strict=True)
            if f.name == "slmops-card.json" and f.parent == v.path
        ),
        None,
    )
    descriptor = _descriptor(v, report, sum(d.size for d in layers), card_digest)
    config = layout.put_json(descriptor.model_dump(mode="json", by_alias=True), MT_VARIANT_CONFIG)
    manifest = Manifest(
        media_type=MT_MANIFEST,
        artifact_type=ARTIFACT_VARIANT,
        config=config,
        layers=layers,
        annotations={ANN_VARIANT: v.name},
    )
    return layout.put_json(
        manifest.to_oci(),
        MT_MANIFEST,
        artifact_type=ARTIFACT_VARIANT,
        annotations={ANN_VARIANT: v.name},
    )


def _descriptor(
    v: FoundVariant, report: EvalReport | None, disk_bytes: int, card_digest: str | None
) -> VariantDescriptor:
    """What a device matches on: evaluated numbers where there is a report, card facts otherwise."""
    info = next((i for i in report.variants if i.name == v.name), None) if report else None
    perf = [p for p in report.perf if p.variant == v.name] if report else []
    context = {p.name: p.context_length for p in report.profiles} if report else {}
    at_context = [
        (p.memory_at_context_bytes, context.get(p.profile))
        for p in perf
        if p.memory_at_context_bytes is not None
    ]
    ram, ram_ctx = max(at_context, key=lambda t: t[0]) if at_context else (None, None)
    rss = [int(p.peak_rss_bytes.max) for p in perf if p.peak_rss_bytes is not None]
    quality = report.quality.get(v.name) if report else None
    return VariantDescriptor(
        name=v.name,
        runtime=info.runtime if info else DEPLOYABLE[v.card.format],
        format=v.card.format,
        quantization=(info.quantization if info else None) or v.card.quantization,
        pruning=info.pruning if info else _pruning_kinds(v.card),
        parameters=info.parameters if info else None,
        disk_bytes=disk_bytes,
        ram_bytes=ram,
        ram_context_tokens=ram_ctx,
        peak_rss_bytes=max(rss) if rss else None,
        kld_mean=quality.kld_mean if quality else None,
        selected_for=sorted(s.profile for s in report.selections if s.variant == v.name)
        if report
        else [],
        fits=sorted(x.profile for x in report.verdicts if x.variant == v.name and x.fits)
        if report
        else [],
        card_digest=card_digest,
        baseline=quality.baseline if quality else None,
    )


def _pruning_kinds(card: LineageCard) -> list[str]:
    return card.pruning_kinds()
