"""Which LoRA adapter a device should load on top of its model (blueprint `adapters:`).

A blueprint lists adapters by label selector; the most specific matching selector wins
(``blueprints/document.assigned_adapter``). The adapter named must be pushed to the registry (its
artifact index under NAME:VERSION), signed (its ``sha256-<hex>`` referrers tag present: the
agent checks the signature itself, this only keeps an unsigned push from reaching devices),
made for the exact base bundle the device is told to run (its subject), and fit the variant
resolved for the device (its descriptor lists the variant manifests it fits, so an ONNX
variant never gets a GGUF LoRA). Otherwise the device runs the model alone and the desired
state says why in ``adapter_unplaceable``.

Which assignments hold for a device is a release's: an adapter change is a rollout like a
version change (``server/rollouts/``: waves, gates, automatic rollback), devices it moved get
its assignments, the others the blueprint's stable ones (``desired.release_adapters``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.bundle.adapter_meta import AdapterDescriptor
from slmops.bundle.media import (
    ARTIFACT_ADAPTER,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MT_LORA_GGUF,
)
from slmops.bundle.oci_ref import referrers_tag
from slmops.protocol.device import DesiredAdapter, DesiredModel
from slmops.server.blueprints.document import AdapterAssignment, Blueprint, assigned_adapter
from slmops.server.registry.store import BlobStore, StoreError
from slmops.server.registry.tables import RegistryTag


@dataclass(frozen=True)
class AdapterTarget:
    digest: str
    manifest_digest: str
    layer_digest: str
    size: int
    descriptor: AdapterDescriptor


AdapterResolver = Callable[[str, str], "AdapterTarget | str"]

# Adapter contents are immutable per digest: cache the parsed artifact by (store, digest).
_CACHE: dict[tuple[str, str], AdapterTarget] = {}
_CACHE_MAX = 256


def _tagged(session: Session, repository: str, tag: str) -> str | None:
    digest = session.scalar(
        select(RegistryTag.digest).where(
            RegistryTag.repository == repository, RegistryTag.tag == tag
        )
    )
    return None if digest is None else str(digest)


def resolve_adapter(
    session: Session, store: BlobStore, name: str, version: str
) -> AdapterTarget | str:
    """The pushed, signed adapter NAME:VERSION, or a sentence saying why it cannot be used."""
    digest = _tagged(session, name, version)
    if digest is None:
        return f"adapter {name}:{version} is not in the registry (push it with `slmops push`)"
    if _tagged(session, name, referrers_tag(digest)) is None:
        return f"adapter {name}:{version} is not signed (sign it, then push it again)"
    key = (str(store.blobs), digest)
    if key in _CACHE:
        return _CACHE[key]
    try:
        index = json.loads(store.read_small(digest, MAX_MANIFEST_BYTES))
        entry = index["manifests"][0]
        manifest = json.loads(store.read_small(entry["digest"], MAX_MANIFEST_BYTES))
        config = json.loads(store.read_small(manifest["config"]["digest"], MAX_CONFIG_BYTES))
        descriptor = AdapterDescriptor.model_validate(config)
        layer = next(x for x in manifest["layers"] if x.get("mediaType") == MT_LORA_GGUF)
        if index.get("artifactType") != ARTIFACT_ADAPTER:
            return f"{name}:{version} is not an adapter artifact"
        target = AdapterTarget(
            digest, str(entry["digest"]), str(layer["digest"]), int(layer["size"]), descriptor
        )
    except (StoreError, OSError, ValueError, KeyError, IndexError, TypeError, StopIteration):
        return f"adapter {name}:{version} cannot be read from the registry"
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = target
    return target


def place_adapter(
    bp: Blueprint,
    labels: dict[str, str],
    model: DesiredModel,
    resolve: AdapterResolver,
    assignments: Sequence[AdapterAssignment] | None = None,
) -> tuple[DesiredModel, str | None]:
    """`model` with the adapter the blueprint assigns for `labels` (from ``assignments``, a
    release's list; None: the spec's), or unchanged and why not (None: no adapter is assigned,
    nothing to explain)."""
    wanted = assigned_adapter(bp, labels, assignments)
    if wanted is None:
        return model, None
    found = resolve(wanted.adapter, wanted.version)
    if isinstance(found, str):
        return model, found
    return attach(model, wanted.adapter, wanted.version, found)


def attach(
    model: DesiredModel, name: str, version: str, found: AdapterTarget
) -> tuple[DesiredModel, str | None]:
    """`model` with the resolved adapter NAME:VERSION, when it was made for `model`'s base
    bundle and variant; else `model` unchanged and why not."""
    label = f"adapter {name}:{version}"
    base = found.descriptor.base
    if base.bundle_digest != model.bundle_digest:
        return model, (
            f"{label} is for {base.name}:{base.version}; the device is to run "
            f"{model.name}:{model.version} (train and bundle an adapter for that base)"
        )
    if found.descriptor.variant(model.manifest_digest) is None:
        fits = ", ".join(v.name for v in found.descriptor.variants)
        return model, (
            f"{label} fits the variants {fits}; this device runs {model.variant} "
            "(ONNX variants cannot load GGUF LoRA adapters)"
        )
    adapter = DesiredAdapter(
        name=name,
        version=version,
        digest=found.digest,
        manifest_digest=found.manifest_digest,
        layer_digest=found.layer_digest,
        size=found.size,
        repository=name,
    )
    return model.model_copy(update={"adapter": adapter}), None
