"""What a device credential may read from the registry: its own bundles, nothing else.

A device needs the bundle it should run (its desired state) and the one it runs (its last
check-in's ``active``, trusted only within the repository its desired state names, since the
device reports it itself), with everything reachable from them: the bundle index, its variant
manifests, their config and layer blobs, and the bundle's signature (the ``sha256-<hex>``
referrers tag and what it points to). Any other repository, manifest or blob is refused, so a
stolen or rogue device credential cannot read every model of the fleet.

Operators (any role) read everything; this module is only asked about devices. The allowed
set is computed once per (device, desired ETag, active model) and kept a minute in a small
in-process LRU, so a download of many ranges costs one dictionary lookup per request.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.bundle.media import MAX_MANIFEST_BYTES
from slmops.bundle.oci_ref import DIGEST_RE, Desc, OciContentError, referrers_tag, walk
from slmops.server.db.models import Device
from slmops.server.registry.store import BlobStore, StoreError
from slmops.server.registry.tables import RegistryTag

CACHE_SIZE = 4096
CACHE_SECONDS = 60.0  # a tag re-pointed or a signature pushed later shows within this long


@dataclass(frozen=True)
class Scope:
    """Repositories and digests (manifests and blobs) one device may read."""

    repositories: frozenset[str]
    digests: frozenset[str]

    def allows(self, repository: str, digest: str | None = None) -> bool:
        return repository in self.repositories and (digest is None or digest in self.digests)


_CACHE: OrderedDict[tuple[object, ...], tuple[float, Scope]] = OrderedDict()
_LOCK = threading.Lock()


def _roots(device: Device) -> list[tuple[str, str | None, str | None]]:
    """(repository, bundle digest or None, version or None) of the desired and active bundles."""
    found: list[tuple[str, str | None, str | None]] = []
    model = (device.desired or {}).get("model") or {}
    if isinstance(model, dict) and model.get("repository") and model.get("bundle_digest"):
        found.append((str(model["repository"]), str(model["bundle_digest"]), None))
    # What the device reports it runs is its own claim, unchecked: it widens the set only within
    # the repository the server itself assigns it (another version of its own model), never to
    # another model (a device under no blueprint could otherwise read any model by claiming it).
    active = device.active or {}
    assigned = (
        str(model["repository"]) if isinstance(model, dict) and model.get("repository") else None
    )
    if (
        isinstance(active, dict)
        and active.get("name")
        and active.get("version")
        and str(active["name"]) == assigned
    ):
        found.append((str(active["name"]), None, str(active["version"])))
    # LoRA adapters (server/adapters.py): only the desired one, by digest
    adapter = model.get("adapter") if isinstance(model, dict) else None
    if isinstance(adapter, dict) and adapter.get("name") and adapter.get("digest"):
        found.append(
            (str(adapter.get("repository") or adapter["name"]), str(adapter["digest"]), None)
        )
    return found


def _tagged(session: Session, repository: str, tag: str) -> str | None:
    digest = session.scalar(
        select(RegistryTag.digest).where(
            RegistryTag.repository == repository, RegistryTag.tag == tag
        )
    )
    return None if digest is None else str(digest)


def _compute(session: Session, store: BlobStore, device: Device) -> Scope:
    repositories: set[str] = set()
    digests: set[str] = set()

    def fetch(desc: Desc) -> bytes:
        return store.read_small(desc.digest, MAX_MANIFEST_BYTES)

    for repository, bundle, version in _roots(device):
        if bundle is None and version is not None:
            bundle = _tagged(session, repository, version)
        if bundle is None or not DIGEST_RE.match(bundle):
            continue
        repositories.add(repository)
        roots = [bundle]
        if (signature := _tagged(session, repository, referrers_tag(bundle))) is not None:
            roots.append(signature)
        for root in roots:
            media = store.manifest_type(root)
            if media is None:
                continue
            try:
                manifests, blobs = walk([Desc(media, root, 0)], fetch)
            except (OciContentError, StoreError, OSError):
                continue  # damaged content: the device may read nothing of it
            digests.update(manifests)
            digests.update(blobs)
    return Scope(frozenset(repositories), frozenset(digests))


def device_scope(session: Session, store: BlobStore, device: Device) -> Scope:
    """The device's readable set, cached per (device, desired state, active model)."""
    active = device.active or {}
    key = (
        device.id,
        device.desired_etag,
        str(active.get("name")),
        str(active.get("version")),
        str(store.blobs),
    )
    now = time.monotonic()
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            _CACHE.move_to_end(key)
            return hit[1]
    scope = _compute(session, store, device)
    with _LOCK:
        _CACHE[key] = (now, scope)
        _CACHE.move_to_end(key)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return scope
