"""Models as operators see them: repositories, versions (bundle tags) and channels.

Everything is read back from what was pushed: a version is a tag on a bundle index, its
variants are the index's children and their VariantDescriptor configs, its BundleInfo the
bundle manifest's config, and its signatures the manifests under the ``sha256-<hex>`` fallback
tag (those tags are not versions and are not listed as such). Configs that do not parse are
reported as problems rather than failing the call, so a registry holding foreign or older
content stays browsable. Channels (``stable``, ``beta``) are names operators move between
versions; blueprints and rollouts resolve them.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

from fastapi import APIRouter
from pydantic import Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.bundle.media import (
    ARTIFACT_BUNDLE,
    ARTIFACT_SIGNATURE,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MT_INDEX,
)
from slmops.bundle.oci_ref import Desc, OciContentError, load_manifest, referrers_tag
from slmops.core.config import StrictModel
from slmops.protocol.bundle import BundleInfo, VariantDescriptor
from slmops.server.api.deps import OperatorDep, SessionDep, SettingsDep, ViewerDep
from slmops.server.db.models import utcnow
from slmops.server.errors import api_error
from slmops.server.openapi import errors
from slmops.server.registry.store import BlobStore, StoreError
from slmops.server.registry.tables import RegistryChannel, RegistryTag

router = APIRouter(prefix="/api/v1/models", tags=["models"])
_REFERRERS_TAG = re.compile(r"^sha256-[0-9a-f]{64}\Z")


class VersionRef(StrictModel):
    tag: str
    digest: str
    updated_at: datetime


class ModelPublic(StrictModel):
    name: str
    versions: list[VersionRef]
    channels: dict[str, str] = Field(description="channel -> version")


class ModelList(StrictModel):
    data: list[ModelPublic]


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


class ChannelSet(StrictModel):
    version: str = Field(min_length=1, max_length=128)


class ChannelPublic(StrictModel):
    name: str
    channel: str
    version: str
    digest: str
    updated_at: datetime


def _tag(session: Session, name: str, tag: str) -> RegistryTag:
    row = session.scalar(
        select(RegistryTag).where(RegistryTag.repository == name, RegistryTag.tag == tag)
    )
    if row is None or _REFERRERS_TAG.match(tag):
        raise api_error(
            404,
            "not_found",
            f"model {name!r} has no version {tag!r}",
            where="version",
            hint="GET /api/v1/models lists the pushed versions",
        )
    return row


@router.get("")
def read_models(session: SessionDep, caller: ViewerDep) -> ModelList:
    models: dict[str, ModelPublic] = {}
    for row in session.scalars(select(RegistryTag).order_by(RegistryTag.repository)):
        model = models.setdefault(
            row.repository, ModelPublic(name=row.repository, versions=[], channels={})
        )
        if not _REFERRERS_TAG.match(row.tag):
            model.versions.append(
                VersionRef(tag=row.tag, digest=row.digest, updated_at=row.updated_at)
            )
    for ch in session.scalars(select(RegistryChannel)):
        if ch.repository in models:
            models[ch.repository].channels[ch.channel] = ch.version
    for model in models.values():
        model.versions.sort(key=lambda v: v.updated_at)
    return ModelList(data=list(models.values()))


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


@router.get("/{name:path}/versions/{version}", responses=errors(404))
def read_version(
    name: str, version: str, session: SessionDep, settings: SettingsDep, caller: ViewerDep
) -> VersionPublic:
    row = _tag(session, name, version)
    store = BlobStore(settings.data_dir)
    signatures = 0
    sig_tag = session.scalar(
        select(RegistryTag).where(
            RegistryTag.repository == name, RegistryTag.tag == referrers_tag(row.digest)
        )
    )
    if sig_tag is not None:
        try:
            data = store.read_small(sig_tag.digest, MAX_MANIFEST_BYTES)
            obj, children, _ = load_manifest(
                data, Desc(sig_tag.media_type, sig_tag.digest, len(data))
            )
            listed = (
                children
                if obj.get("mediaType") == MT_INDEX
                else [Desc(sig_tag.media_type, sig_tag.digest, 0, ARTIFACT_SIGNATURE)]
            )
            signatures = sum(1 for c in listed if c.artifact_type in (None, ARTIFACT_SIGNATURE))
        except (StoreError, OciContentError):
            signatures = 0
    return describe(store, name, version, row.digest, signatures)


def _channel_public(name: str, ch: RegistryChannel, digest: str) -> ChannelPublic:
    return ChannelPublic(
        name=name, channel=ch.channel, version=ch.version, digest=digest, updated_at=ch.updated_at
    )


@router.put("/{name:path}/channels/{channel}", responses=errors(400, 404))
def set_channel(
    name: str,
    channel: str,
    body: ChannelSet,
    session: SessionDep,
    settings: SettingsDep,
    caller: OperatorDep,
) -> ChannelPublic:
    """Point a channel at a pushed version; refused when that version does not exist."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", channel):
        raise api_error(
            400,
            "bad_request",
            f"invalid channel {channel!r}",
            where="channel",
            hint="lowercase letters, digits, . _ -",
        )
    tag = _tag(session, name, body.version)
    ch = session.scalar(
        select(RegistryChannel).where(
            RegistryChannel.repository == name, RegistryChannel.channel == channel
        )
    ) or RegistryChannel(repository=name, channel=channel)
    ch.version, ch.updated_at = body.version, utcnow()
    session.add(ch)
    session.commit()
    # Blueprints following this channel roll the new version out now, not at the next check-in.
    from slmops.server.rollouts import Context, reconcile_following, settle  # they import this

    ctx = Context(BlobStore(settings.data_dir), settings.poll_seconds)
    reconcile_following(session, name, channel, actor=caller.name, ctx=ctx)
    settle(session, ctx)
    return _channel_public(name, ch, tag.digest)


@router.get("/{name:path}/channels/{channel}", responses=errors(404))
def read_channel(name: str, channel: str, session: SessionDep, caller: ViewerDep) -> ChannelPublic:
    ch = session.scalar(
        select(RegistryChannel).where(
            RegistryChannel.repository == name, RegistryChannel.channel == channel
        )
    )
    if ch is None:
        raise api_error(
            404,
            "not_found",
            f"model {name!r} has no channel {channel!r}",
            where="channel",
            hint="set it with PUT .../channels/{channel}",
        )
    return _channel_public(name, ch, _tag(session, name, ch.version).digest)
