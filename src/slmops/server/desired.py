"""Desired state from blueprints and rollouts: which version and variant each device should run.

For a device, the governing blueprint is the one whose selector matches its effective labels
(reported, overridden by operator labels). When several match, the most specific selector
(most keys) wins and ties go to the first name in alphabetical order, so the answer never
depends on the order blueprints were applied.

Which *version* the device should run is the blueprint's rollout plan (``plan_for``): a device
the blueprint's latest rollout has moved gets its target (or, once reverted, the version it had
before); a device still queued keeps what it runs; any other device gets the blueprint's stable
version (the last version a rollout brought to completion), but only when it runs no version of
the model yet (a first install) or runs that one already: anything but a rollout's assignment
is the version the device already runs. A device's version is the later of its last check-in
and its last action report (``rollouts.note_running``). The version's bundle index is read
from the registry store, and ``resolve_variant`` picks a variant for the device's inventory;
when none fits, the device keeps what it runs and gets the reason in ``unplaceable``.

Adapters follow the same rule (``release_adapters``): a device the rollout moved (or skipped:
already there) gets the rollout's adapter assignments, any other one the blueprint's stable
assignments, and outside an assignment a device keeps the adapter it runs (``keep_adapter``).

So a blueprint change never moves devices by itself: it creates a rollout (``server/rollouts/``),
and only the rollout's assignments change what devices are told. Everything here is computed
from stored rows, so any API process gives the same answer.

The upper half is pure (shared by tests); the lower half reads the database and the store.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from slmops.protocol.device import DesiredModel, DesiredState, Inventory
from slmops.server import desired_store
from slmops.server.adapters import (
    AdapterResolver,
    AdapterTarget,
    attach,
    place_adapter,
    resolve_adapter,
)
from slmops.server.blueprints.document import (
    AdapterAssignment,
    Blueprint,
    ModelRef,
    assigned_adapter,
    effective_generation,
    matches,
    parse_release,
)
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.db.models import Device, merged_labels
from slmops.server.device_plan import Plan, plan_for, release_adapters
from slmops.server.registry.store import BlobStore
from slmops.server.resolve import resolve_variant
from slmops.server.rollouts.machine import DeviceRecord, RolloutState
from slmops.server.rollouts.store import device_record, records_of
from slmops.server.rollouts.tables import Rollout
from slmops.server.targets import (
    Target,
    TargetCache,
    load_blueprints,
    resolve_target,
    resolve_version,
    to_blueprint,
)


def governing(blueprints: list[Blueprint], labels: dict[str, str]) -> Blueprint | None:
    """The matching blueprint with the most selector keys; ties to the smallest name."""
    fitting = [b for b in blueprints if matches(b.spec.selector, labels)]
    return min(fitting, key=lambda b: (-len(b.spec.selector), b.metadata.name), default=None)


def desired_for(
    device_id: str,
    inventory: Inventory | None,
    labels: dict[str, str],
    bp: Blueprint,
    target: Target | str | None,
    *,
    poll_seconds: float,
    plan: Plan | None = None,
    adapters: AdapterResolver | None = None,
    assignments: list[AdapterAssignment] | None = None,
) -> DesiredState:
    """The desired state under ``bp``; ``target`` is the resolved version, why there is none,
    or None (keep what runs); ``plan`` adds the rollout id and revert flag to the model;
    ``adapters`` resolves the adapter ``assignments`` give the device (None: the spec's;
    server/adapters.py)."""
    generation = effective_generation(bp, device_id, labels)
    base = DesiredState(
        device_id=device_id,
        generation=generation,
        poll_seconds=poll_seconds,
        telemetry=bp.spec.telemetry,
    )
    if target is None:
        return base
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
        rollout_id=plan.rollout_id if plan else None,
        revert=plan.revert if plan else False,
        registry=bp.spec.registry,  # the bytes from there; variants resolved from our copy
    )
    if adapters is not None:
        model, why = place_adapter(bp, labels, model, adapters, assignments)
        base = base.model_copy(update={"adapter_unplaceable": why})
    return base.model_copy(update={"model": model})


def canonical(doc: DesiredState) -> bytes:
    """The JSON served to the device; its hash is the ETag, so keys are sorted, no spaces."""
    return json.dumps(
        doc.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":")
    ).encode()


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


# --- database and registry ------------------------------------------------------------------


def store_desired(device: Device, doc: DesiredState) -> str:
    """Write the desired state and its ETag on the device row (the caller commits), only if
    the row still has the ETag the device object was read with (``server/desired_store.py``:
    a recompute from an older snapshot must not overwrite a newer one). Inside
    ``refresh_devices`` the write is gathered and done with the batch (a miss is recomputed
    there); called on its own, a miss clears the ETag so the next check-in recomputes. A write
    that happened marks the device on the session: when it commits, every API process drops
    the device's cached check-in answer (``server/invalidation.py``)."""
    etag = etag_of(canonical(doc))
    if device.desired_etag == etag:
        return etag
    session = object_session(device)
    dumped = doc.model_dump(mode="json", by_alias=True)
    if session is None:  # a detached object (pure tests): nothing to race with
        device.desired, device.desired_etag = dumped, etag
        return etag
    one = desired_store.Write(device, dumped, etag, device.desired_etag)
    pending: list[desired_store.Write] | None = session.info.get(desired_store.PENDING)
    if pending is not None:
        pending.append(one)
    elif desired_store.write(session, [one]):
        desired_store.clear(session, device)
    return etag


def inventory_of(device: Device) -> Inventory | None:
    try:
        return Inventory.model_validate(device.inventory) if device.inventory else None
    except ValidationError:
        return None


def current_version(device: Device, model: str) -> str | None:
    """The version of ``model`` the device reported active, or None (none, or another model)."""
    active = device.active or {}
    return str(active["version"]) if active.get("name") == model and active.get("version") else None


def latest_rollout(session: Session, blueprint: str) -> Rollout | None:
    return session.scalar(
        select(Rollout).where(Rollout.blueprint == blueprint).order_by(Rollout.seq.desc()).limit(1)
    )


class Refresher:
    """Recomputes devices against one snapshot of blueprints and rollouts; each version is
    resolved and each rollout parsed once per snapshot."""

    def __init__(
        self,
        session: Session,
        store: BlobStore,
        *,
        poll_seconds: float,
        targets: TargetCache | None = None,
    ) -> None:
        self.session, self.store, self.poll_seconds = session, store, poll_seconds
        self.cache = targets
        rows = list(session.scalars(select(BlueprintRow)))
        self.blueprints = [to_blueprint(r) for r in rows]
        self.stable = {r.name: r.stable_version for r in rows}
        self.stable_adapters = {r.name: parse_release(r.stable_adapters) for r in rows}
        self._adapters: dict[tuple[str, str], AdapterTarget | str] = {}
        self._targets: dict[tuple[str, str], Target | str] = {}
        self._rollouts: dict[str, RolloutState | None] = {}
        self._records: dict[str, dict[str, DeviceRecord]] = {}  # preloaded, per rollout id

    def resolve_adapter(self, name: str, version: str) -> AdapterTarget | str:
        """``adapters.resolve_adapter``, once per snapshot (matching a release asks for the
        same few adapters once per device)."""
        key = (name, version)
        if key not in self._adapters:
            self._adapters[key] = resolve_adapter(self.session, self.store, name, version)
        return self._adapters[key]

    def target(self, name: str, version: str) -> Target | str:
        key = (name, version)
        if key not in self._targets:
            ref = ModelRef(name=name, version=version)
            self._targets[key] = resolve_target(self.session, self.store, ref, self.cache)
        return self._targets[key]

    def spec_target(self, bp: Blueprint) -> Target | str:
        try:
            version = resolve_version(self.session, bp.spec.model)
        except LookupError as exc:
            return str(exc)
        return self.target(bp.spec.model.name, version)

    def rollout(self, bp: Blueprint) -> RolloutState | None:
        name = bp.metadata.name
        if name not in self._rollouts:
            row = latest_rollout(self.session, name)
            self._rollouts[name] = RolloutState.from_json(row.state_json) if row else None
        return self._rollouts[name]

    def record(self, rollout: RolloutState, device_id: str) -> DeviceRecord | None:
        """The device's record in ``rollout``: one primary-key read, unless preloaded."""
        if rollout.devices:  # a document written before rows existed holds them inline
            return rollout.devices.get(device_id)
        preloaded = self._records.get(rollout.rollout_id)
        if preloaded is not None:
            return preloaded.get(device_id)
        return device_record(self.session, rollout.rollout_id, device_id)

    def preload(self, device_ids: set[str] | None = None) -> None:
        """Read the latest rollouts' records (of ``device_ids``, or all) in a few queries: for
        recomputing many devices, instead of one read per device."""
        for bp in self.blueprints:
            rollout = self.rollout(bp)
            if rollout is not None and not rollout.devices:
                found = records_of(self.session, rollout.rollout_id, device_ids)
                self._records[rollout.rollout_id] = found

    def governing(self, device: Device) -> Blueprint | None:
        return governing(self.blueprints, device.effective_labels)

    def desired(self, device: Device, bp: Blueprint) -> DesiredState:
        labels, inv = device.effective_labels, inventory_of(device)
        rollout = self.rollout(bp)
        record = self.record(rollout, device.device_id) if rollout is not None else None
        current = current_version(device, bp.spec.model.name)
        name = bp.metadata.name
        plan = plan_for(self.stable.get(name), rollout, record, current)
        assignments = release_adapters(plan, rollout, self.stable_adapters.get(name, []))
        target: Target | str | None
        if plan.version is not None:
            target = self.target(bp.spec.model.name, plan.version)
        elif rollout is None:
            # No rollout yet: either the spec's version cannot be resolved (say why), or an
            # apply is creating the first rollout right now; never hand out the version itself,
            # only a rollout may move a device.
            spec = self.spec_target(bp)
            target = spec if isinstance(spec, str) else None
        else:
            target = None  # queued with nothing before the rollout: keep what runs
        doc = desired_for(
            device.device_id,
            inv,
            labels,
            bp,
            target,
            poll_seconds=self.poll_seconds,
            plan=plan,
            adapters=self.resolve_adapter,
            assignments=assignments,
        )
        if plan.rollout_id is None:
            doc = self.keep_adapter(device, doc, bp, rollout)
        if not plan.known and rollout is not None and not rollout.status.is_terminal:
            why = self.misfit(device, rollout.target_version, bp, rollout.adapters)
            if why:  # the rollout cannot place it: say so, and keep the stable version
                doc = doc.model_copy(update={"unplaceable": why})
        return doc

    def keep_adapter(
        self, device: Device, doc: DesiredState, bp: Blueprint, rollout: RolloutState | None
    ) -> DesiredState:
        """Outside a rollout's assignment a device keeps the adapter version it runs, as it
        keeps its model version: only a rollout moves it to another one. That holds while the
        stable release or the latest rollout's release gives the device's labels an adapter of
        that name; a label change that assigns another adapter (another site) gives it the
        stable one, as it would give a device the rollout moved. A device running no adapter
        gets the stable one (like a first install); one whose adapter left the registry, or no
        longer fits the model it is told to run, gets what the stable release says."""
        model = doc.model
        running = (device.active or {}).get("adapter") or {}
        if model is None or not running.get("digest"):
            return doc
        if model.adapter is not None and model.adapter.digest == running["digest"]:
            return doc
        if current_version(device, model.name) != model.version:
            return doc
        labels = device.effective_labels
        releases = [self.stable_adapters.get(bp.metadata.name, [])]
        if rollout is not None and rollout.adapters is not None:
            releases.append(parse_release(rollout.adapters))
        named = {a.adapter for r in releases if (a := assigned_adapter(bp, labels, r))}
        if running.get("name") not in named:
            return doc
        found = self.resolve_adapter(str(running.get("name")), str(running.get("version")))
        if isinstance(found, str) or found.digest != running["digest"]:
            return doc
        kept, why = attach(model, str(running["name"]), str(running["version"]), found)
        if why is not None:
            return doc
        return doc.model_copy(update={"model": kept, "adapter_unplaceable": None})

    def on_release(
        self, device: Device, bp: Blueprint, version: str, adapters: list[dict[str, Any]] | None
    ) -> bool | None:
        """Whether the device already runs the release ``version`` + ``adapters`` (the adapter
        those assignments give it, or none); None for a release without adapters recorded."""
        if adapters is None:
            return None
        if current_version(device, bp.spec.model.name) != version:
            return False
        target = self.target(bp.spec.model.name, version)
        if isinstance(target, str):
            return False
        doc = desired_for(
            device.device_id,
            inventory_of(device),
            device.effective_labels,
            bp,
            target,
            poll_seconds=self.poll_seconds,
            adapters=self.resolve_adapter,
            assignments=parse_release(adapters),
        )
        want = doc.model.adapter.digest if doc.model and doc.model.adapter else None
        running = ((device.active or {}).get("adapter") or {}).get("digest")
        return want == running

    def misfit(
        self,
        device: Device,
        version: str,
        bp: Blueprint,
        adapters: list[dict[str, Any]] | None = None,
    ) -> str | None:
        """Why the release ``version`` (+ ``adapters``, a rollout's assignments) cannot be placed
        on the device, or None. An adapter the release gives the device that is not pushed, not
        signed or unreadable makes it unplaceable: it keeps what it runs (its current adapter
        included) until the adapter arrives. An adapter made for another base or variant does
        not: the device runs the model alone and its desired state says why."""
        target = self.target(bp.spec.model.name, version)
        if isinstance(target, str):
            return target
        inv = inventory_of(device)
        if inv is None:
            return "the device has not reported an inventory"
        res = resolve_variant(inv, [d for d, _ in target.variants])
        if not res.variant:
            return f"{target.name}:{version}: {res.reason}"
        wanted = assigned_adapter(bp, device.effective_labels, parse_release(adapters))
        if adapters is None or wanted is None:
            return None
        found = self.resolve_adapter(wanted.adapter, wanted.version)
        return found if isinstance(found, str) else None

    def refresh(self, device: Device) -> Blueprint | None:
        """Recompute one device; returns its governing blueprint. A device nothing governs
        is told to keep what it runs."""
        bp = self.governing(device)
        if bp is None:
            doc = DesiredState(device_id=device.device_id, poll_seconds=self.poll_seconds)
        else:
            doc = self.desired(device, bp)
        store_desired(device, doc)
        return bp


def refresh_devices(
    session: Session,
    store: BlobStore,
    *,
    poll_seconds: float,
    device_ids: set[str] | None = None,
    targets: TargetCache | None = None,
) -> Counter[str]:
    """Recompute every device (or those named) without committing; counts devices per
    governing blueprint name.

    The devices' ETags are read first, then the snapshot (``Refresher``), and the documents are
    written conditionally on those ETags (``server/desired_store.py``). Devices another writer
    changed meanwhile are recomputed once more with their rows locked, from a new snapshot, so
    whoever writes last wrote from the newest one."""
    governing_of: dict[str, str | None] = {}
    ids = None if device_ids is None else set(device_ids)
    for attempt in range(3):
        if ids is not None and not ids:
            break
        if attempt:
            desired_store.lock(session, ids or ())
        query = select(Device).order_by(Device.device_id)
        if ids is not None:
            query = query.where(Device.device_id.in_(sorted(ids)))
        # fresh rows (and ETags) before the snapshot: the ETag a write is conditional on
        devices = list(session.scalars(query.execution_options(populate_existing=True)))
        refresher = Refresher(session, store, poll_seconds=poll_seconds, targets=targets)
        if ids is None or len(ids) > 50:
            refresher.preload(ids)  # a few reads per rollout rather than one per device
        pending: list[desired_store.Write] = []
        outer = session.info.get(desired_store.PENDING)
        session.info[desired_store.PENDING] = pending
        try:
            for device in devices:
                bp = refresher.refresh(device)
                governing_of[device.device_id] = bp.metadata.name if bp is not None else None
        finally:
            session.info[desired_store.PENDING] = outer
            if outer is None:
                del session.info[desired_store.PENDING]
        ids = {w.device.device_id for w in desired_store.write(session, pending)}
    return Counter(name for name in governing_of.values() if name is not None)


def governed(session: Session) -> Counter[str]:
    """Devices per governing blueprint name, computed without writing anything. Reads only
    the two label columns: whole device rows (inventory, desired state) made an unchanged
    re-apply over 100,000 devices take 6 s."""
    blueprints = load_blueprints(session)
    counts: Counter[str] = Counter()
    for labels, operator_labels in session.execute(select(Device.labels, Device.operator_labels)):
        bp = governing(blueprints, merged_labels(labels, operator_labels))
        if bp is not None:
            counts[bp.metadata.name] += 1
    return counts
