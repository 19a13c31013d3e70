"""Desired state from blueprints: which model version and variant each device should run.

For a device, the governing blueprint is the one whose selector matches its effective labels
(reported, overridden by operator labels). When several match, the most specific selector
(most keys) wins and ties go to the first name in alphabetical order, so the answer never
depends on the order blueprints were applied. The blueprint's model is resolved to a version
(pinned, or the channel's current version), the version's bundle index is read from the
registry store, and ``resolve_variant`` picks a variant for the device's inventory; when none
fits, the device gets ``model=None`` (keep what runs) and the reason in ``unplaceable``.

No rollout waves yet: a change moves every matching device at once. Devices no blueprint
governs keep whatever desired state a rollout wrote, but one a blueprint wrote (a model without a
rollout id, or an ``unplaceable`` reason) is reset to "keep what runs".

The upper half is pure (shared by tests); the lower half reads the database and the store.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.protocol.bundle import VariantDescriptor
from slmops.protocol.device import DesiredModel, DesiredState, Inventory
from slmops.server.blueprint import Blueprint, ModelRef, effective_generation, matches
from slmops.server.blueprints_table import BlueprintRow
from slmops.server.db.models import Device
from slmops.server.registry.store import BlobStore
from slmops.server.registry.tables import RegistryChannel, RegistryTag
from slmops.server.resolve import resolve_variant


@dataclass(frozen=True)
class Target:
    """One bundle version as pushed: its index digest and its variants' descriptors."""

    name: str
    version: str
    bundle_digest: str
    variants: tuple[tuple[VariantDescriptor, str], ...]  # (descriptor, variant manifest digest)


def governing(blueprints: list[Blueprint], labels: dict[str, str]) -> Blueprint | None:
    """The matching blueprint with the most selector keys; ties to the smallest name."""
    fitting = [b for b in blueprints if matches(b.spec.selector, labels)]
    return min(fitting, key=lambda b: (-len(b.spec.selector), b.metadata.name), default=None)


def desired_for(
    device_id: str,
    inventory: Inventory | None,
    labels: dict[str, str],
    bp: Blueprint,
    target: Target | str,
    *,
    poll_seconds: float,
) -> DesiredState:
    """The desired state under ``bp``; ``target`` is the resolved version or why there is none."""
    generation = effective_generation(bp, device_id, labels)
    base = DesiredState(device_id=device_id, generation=generation, poll_seconds=poll_seconds)
    if isinstance(target, str):
        return base.model_copy(update={"unplaceable": target})
    if inventory is None:
        return base.model_copy(update={"unplaceable": "the device has not reported an inventory"})
    res = resolve_variant(inventory, [d for d, _ in target.variants])
    if res.variant is None:
        return base.model_copy(update={"unplaceable": res.reason})
    manifest = next(m for d, m in target.variants if d.name == res.variant)
    model = DesiredModel(
        name=target.name,
        version=target.version,
        variant=res.variant,
        bundle_digest=target.bundle_digest,
        manifest_digest=manifest,
        repository=target.name,
    )
    return base.model_copy(update={"model": model})


def canonical(doc: DesiredState) -> bytes:
    """The JSON served to the device; its hash is the ETag, so keys are sorted, no spaces."""
    return json.dumps(
        doc.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":")
    ).encode()


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


# --- database and registry ------------------------------------------------------------------


def to_blueprint(row: BlueprintRow) -> Blueprint:
    return Blueprint.model_validate(
        {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": row.name}}
        | {"spec": row.spec}
    )


def load_blueprints(session: Session) -> list[Blueprint]:
    return [to_blueprint(r) for r in session.scalars(select(BlueprintRow))]


def resolve_target(session: Session, store: BlobStore, ref: ModelRef) -> Target | str:
    """The pushed version ``ref`` names, or a sentence saying why it cannot be resolved."""
    from slmops.server.registry.models_api import describe  # models_api imports this module

    version = ref.version
    if version is None:
        channel = session.scalar(
            select(RegistryChannel).where(
                RegistryChannel.repository == ref.name, RegistryChannel.channel == ref.channel
            )
        )
        if channel is None:
            return f"model {ref.name!r} has no channel {ref.channel!r}"
        version = channel.version
    tag = session.scalar(
        select(RegistryTag).where(RegistryTag.repository == ref.name, RegistryTag.tag == version)
    )
    if tag is None:
        return f"model {ref.name!r} has no version {version!r} in the registry"
    described = describe(store, ref.name, version, tag.digest, 0)
    variants = tuple((v.descriptor, v.digest) for v in described.variants if v.descriptor)
    if not variants and described.problems:
        return f"{ref.name}:{version} cannot be read: " + "; ".join(described.problems[:2])
    return Target(ref.name, version, tag.digest, variants)


def store_desired(device: Device, doc: DesiredState) -> str:
    """Write the desired state and its ETag on the device row (the caller commits)."""
    etag = etag_of(canonical(doc))
    if device.desired_etag != etag:
        device.desired = doc.model_dump(mode="json", by_alias=True)
        device.desired_etag = etag
    return etag


def _inventory(device: Device) -> Inventory | None:
    try:
        return Inventory.model_validate(device.inventory) if device.inventory else None
    except ValidationError:
        return None


def _from_blueprint(desired: dict[str, Any] | None) -> bool:
    """Whether a stored desired state was written here: blueprints set a model without a
    rollout id, or an ``unplaceable`` reason; rollouts always set their id."""
    if not desired:
        return False
    model = desired.get("model")
    return bool(desired.get("unplaceable")) or bool(model and not model.get("rollout_id"))


class Refresher:
    """Recomputes devices against one snapshot of blueprints; each version is resolved once."""

    def __init__(self, session: Session, store: BlobStore, *, poll_seconds: float) -> None:
        self.session, self.store, self.poll_seconds = session, store, poll_seconds
        self.blueprints = load_blueprints(session)
        self._targets: dict[str, Target | str] = {}

    def target(self, bp: Blueprint) -> Target | str:
        key = bp.spec.model.model_dump_json()
        if key not in self._targets:
            self._targets[key] = resolve_target(self.session, self.store, bp.spec.model)
        return self._targets[key]

    def refresh(self, device: Device, released: Blueprint | None = None) -> Blueprint | None:
        """Recompute one device; returns its governing blueprint (None: left as it was).

        A device nothing governs now is reset to "keep what runs" when its stored state came
        from a blueprint, or when ``released`` (a blueprint's previous revision) matched it,
        instead of keeping a stale model; a state a rollout wrote is left alone.
        """
        labels = device.effective_labels
        bp = governing(self.blueprints, labels)
        if bp is not None:
            doc = desired_for(
                device.device_id,
                _inventory(device),
                labels,
                bp,
                self.target(bp),
                poll_seconds=self.poll_seconds,
            )
            store_desired(device, doc)
        elif _from_blueprint(device.desired) or (
            released is not None and matches(released.spec.selector, labels)
        ):
            store_desired(
                device, DesiredState(device_id=device.device_id, poll_seconds=self.poll_seconds)
            )
        return bp


def refresh_fleet(
    session: Session,
    store: BlobStore,
    *,
    poll_seconds: float,
    released: Blueprint | None = None,
) -> Counter[str]:
    """Recompute every device and commit; counts devices per governing blueprint name."""
    refresher = Refresher(session, store, poll_seconds=poll_seconds)
    counts: Counter[str] = Counter()
    for device in session.scalars(select(Device)):
        bp = refresher.refresh(device, released)
        if bp is not None:
            counts[bp.metadata.name] += 1
    session.commit()
    return counts


def governed(session: Session) -> Counter[str]:
    """Devices per governing blueprint name, computed without writing anything."""
    blueprints = load_blueprints(session)
    counts: Counter[str] = Counter()
    for device in session.scalars(select(Device)):
        bp = governing(blueprints, device.effective_labels)
        if bp is not None:
            counts[bp.metadata.name] += 1
    return counts
