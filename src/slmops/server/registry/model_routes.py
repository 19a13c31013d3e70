"""Models as operators see them, under /api/v1/models: repositories, versions (bundle tags)
and channels. (The OCI distribution API under /v2 that push and pull speak is ``routes.py``.)

Everything is read back from what was pushed: a version is a tag on a bundle index, its
variants are the index's children and their VariantDescriptor configs, its BundleInfo the
bundle manifest's config, and its signatures the manifests under the ``sha256-<hex>`` fallback
tag (those tags are not versions and are not listed as such). Configs that do not parse are
reported as problems rather than failing the call, so a registry holding foreign or older
content stays browsable. Channels (``stable``, ``beta``) are names operators move between
versions; blueprints and rollouts resolve them. What a version holds is read by
``registry/catalog.describe`` (no HTTP there: desired state uses it too).
"""

from __future__ import annotations

import re

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.bundle.media import ARTIFACT_SIGNATURE, MAX_MANIFEST_BYTES, MT_INDEX
from slmops.bundle.oci_ref import Desc, OciContentError, load_manifest, referrers_tag
from slmops.server.api.deps import OperatorDep, ServicesDep, SessionDep, ViewerDep
from slmops.server.errors import api_error
from slmops.server.openapi import errors
from slmops.server.registry.catalog import VersionPublic, describe
from slmops.server.registry.channels import move_channel
from slmops.server.registry.schemas import (
    ChannelPublic,
    ChannelSet,
    ModelList,
    ModelPublic,
    VersionRef,
)
from slmops.server.registry.store import StoreError
from slmops.server.registry.tables import RegistryChannel, RegistryTag

router = APIRouter(prefix="/api/v1/models", tags=["models"])
_REFERRERS_TAG = re.compile(r"^sha256-[0-9a-f]{64}\Z")


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


@router.get("/{name:path}/versions/{version}", responses=errors(404))
def read_version(
    name: str, version: str, session: SessionDep, services: ServicesDep, caller: ViewerDep
) -> VersionPublic:
    row = _tag(session, name, version)
    store = services.store
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
    services: ServicesDep,
    caller: OperatorDep,
) -> ChannelPublic:
    """Point a channel at a pushed version (``registry/channels.move_channel``: blueprints
    following it roll it out); refused when that version does not exist."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", channel):
        raise api_error(
            400,
            "bad_request",
            f"invalid channel {channel!r}",
            where="channel",
            hint="lowercase letters, digits, . _ -",
        )
    tag = _tag(session, name, body.version)
    ctx = services.context()
    ch = move_channel(session, name, channel, body.version, actor=caller.name, ctx=ctx)
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
