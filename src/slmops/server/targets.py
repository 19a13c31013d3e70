"""Resolving what a blueprint names: its stored rows as documents, a version from a pin or a
channel, and a version's bundle (index digest, variants) from the registry, cached per app.

Split from ``desired.py`` (which decides what each device runs) because every layer above needs
these lookups and none of them needs the per-device decision.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.protocol.bundle import VariantDescriptor
from slmops.server.blueprints.document import Blueprint, ModelRef
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.registry.catalog import describe
from slmops.server.registry.store import BlobStore
from slmops.server.registry.tables import RegistryChannel, RegistryTag


@dataclass(frozen=True)
class Target:
    """One bundle version as pushed: its index digest and its variants' descriptors."""

    name: str
    version: str
    bundle_digest: str
    variants: tuple[tuple[VariantDescriptor, str], ...]  # (descriptor, variant manifest digest)


def to_blueprint(row: BlueprintRow) -> Blueprint:
    return Blueprint.model_validate(
        {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": row.name}}
        | {"spec": row.spec}
    )


def load_blueprints(session: Session) -> list[Blueprint]:
    return [to_blueprint(r) for r in session.scalars(select(BlueprintRow))]


def resolve_version(session: Session, ref: ModelRef) -> str:
    """The version ``ref`` pins or its channel points at; ``LookupError`` says why there is none."""
    if ref.version is not None:
        return ref.version
    channel = session.scalar(
        select(RegistryChannel).where(
            RegistryChannel.repository == ref.name, RegistryChannel.channel == ref.channel
        )
    )
    if channel is None:
        raise LookupError(f"model {ref.name!r} has no channel {ref.channel!r}")
    return channel.version


def resolve_target(
    session: Session, store: BlobStore, ref: ModelRef, cache: TargetCache | None = None
) -> Target | str:
    """The pushed version ``ref`` names, or a sentence saying why it cannot be resolved.

    ``cache`` (the app's, ``server/context.Services``) spares re-reading the bundle's
    manifests from disk; without one every call reads them."""
    try:
        version = resolve_version(session, ref)
    except LookupError as exc:
        return str(exc)
    tag = session.scalar(
        select(RegistryTag).where(RegistryTag.repository == ref.name, RegistryTag.tag == version)
    )
    if tag is None:
        return f"model {ref.name!r} has no version {version!r} in the registry"
    key = (str(store.blobs), ref.name, version, tag.digest)
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return cached
    described = describe(store, ref.name, version, tag.digest, 0)
    variants = tuple((v.descriptor, v.digest) for v in described.variants if v.descriptor)
    if not variants and described.problems:
        return f"{ref.name}:{version} cannot be read: " + "; ".join(described.problems[:2])
    target = Target(ref.name, version, tag.digest, variants)
    if cache is not None:
        cache.put(key, target)
    return target


class TargetCache:
    """Resolved versions of one app (``server/context.Services``), at most ``limit``.

    Bundle contents are immutable per digest and version tags cannot be re-pointed (the registry
    answers 409), so a resolved version is cached by its tag's digest. This keeps check-ins from re-reading manifests from disk
    each time; failures are not cached, as a blob may still be arriving. App-scoped rather than
    a module global, so two apps in one process (tests) never share entries.
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._items: dict[tuple[str, str, str, str], Target] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str, str]) -> Target | None:
        return self._items.get(key)

    def put(self, key: tuple[str, str, str, str], target: Target) -> None:
        with self._lock:
            if len(self._items) >= self.limit:
                self._items.pop(next(iter(self._items)))
            self._items[key] = target

    def __len__(self) -> int:
        return len(self._items)
