"""An in-process control-plane database on SQLite or a throwaway PostgreSQL (tests/pg.py), and a
small fleet in it: one blueprint, devices running version 1.0, a rollout to 2.0 that matched
them (queued, not started). For tests that drive the service functions (``run_event``,
``refresh_devices``, ``settle``) with real sessions and need to interleave two of them.

The registry holds no bundle here, so every desired state says why its version cannot be
placed (``unplaceable`` names the version): enough to tell an assignment (2.0) from the
version a queued device keeps (1.0), without building bundles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from control_plane import inventory
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.context import Context
from slmops.server.db.models import Device, utcnow
from slmops.server.db.session import Database, open_database
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts.machine import (
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RolloutPolicy,
    create_rollout,
)
from slmops.server.rollouts.service import run_event
from slmops.server.rollouts.store import load_full
from slmops.server.rollouts.tables import Rollout
from slmops.server.settings import load_settings

BLUEPRINT = "lab"
RID = "lab-1"
POLICY = {
    "waves": [{"count": 2}, {"percent": 100}],
    "gates": {"min_soak_seconds": 1e6, "timeout_seconds": 2e6},
}


@contextlib.contextmanager
def database(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    """A migrated database of ``kind`` ("sqlite" in tmp_path, or "postgresql")."""
    with contextlib.ExitStack() as stack:
        if kind == "postgresql":
            from pg import postgres_cluster

            monkeypatch.setenv("SLMOPS_DB_URL", stack.enter_context(postgres_cluster()))
        else:
            monkeypatch.delenv("SLMOPS_DB_URL", raising=False)
        db = open_database(load_settings(data_dir=tmp_path))
        assert db.engine.dialect.name == kind
        try:
            yield db
        finally:
            db.dispose()


def spec(policy: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "selector": {"site": "lab"},
        "model": {"name": "m", "version": "2.0"},
        "generation": {"temperature": 0.2},
        "rollout": policy or POLICY,
    }


ACTIVE = {"name": "m", "version": "1.0", "variant": "q4", "digest": "sha256:" + "0" * 64}


def make_fleet(
    db: Database, ctx: Context, n: int = 6, others: int = 0, policy: dict[str, Any] | None = None
) -> list[str]:
    """``n`` lab devices (and ``others`` no blueprint governs) on m:1.0, the blueprint (stable
    1.0, spec 2.0) and its rollout with every lab device matched; returns the lab device ids."""
    ids = [f"dev-{i:02d}" for i in range(n)]
    with db.sessions() as s:
        for i, device_id in enumerate([*ids, *(f"other-{k}" for k in range(others))]):
            lab = device_id in ids
            s.add(
                Device(
                    device_id=device_id,
                    credential_hash=f"{i:064d}",
                    labels={"site": "lab" if lab else "elsewhere"},
                    operator_labels={},
                    inventory=inventory(labels={"site": "lab" if lab else "elsewhere"}),
                    profile="rpi5",
                    active=ACTIVE,
                )
            )
        policy = policy or POLICY
        s.add(BlueprintRow(name=BLUEPRINT, spec=spec(policy), generation=1, stable_version="1.0"))
        state = create_rollout(RID, "2.0", now=ctx.now, policy=RolloutPolicy.from_data(policy))
        s.add(
            Rollout(
                id=RID,
                blueprint=BLUEPRINT,
                model="m",
                target_version="2.0",
                state_json=state.to_json(),
                status=state.status.value,
                revision=0,
                seq=1,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )
        s.commit()
        matched = [
            MatchedDevice(device_id=d, hardware_class="rpi5", current_version="1.0") for d in ids
        ]
        run_event(s, RID, DevicesMatched(devices=matched), ctx)
    return ids


def start(db: Database, ctx: Context) -> set[str]:
    """Start the rollout in a session of its own (another request or process); returns the
    devices its first wave assigned."""
    with db.sessions() as s:
        run_event(s, RID, OperatorCommand(action=OperatorAction.START, actor="t"), ctx)
        row = s.get(Rollout, RID)
        assert row is not None
        return {d for d, r in load_full(s, row).devices.items() if r.wave == 0}


def set_temperature(db: Database, temperature: float) -> None:
    """An apply's table write: every lab device's desired state changes with it."""
    with db.sessions() as s:
        row = s.scalar(select(BlueprintRow).where(BlueprintRow.name == BLUEPRINT))
        assert row is not None
        row.spec = {**row.spec, "generation": {"temperature": temperature}}
        s.commit()


def stored(db: Database) -> dict[str, tuple[Any, str | None]]:
    """Every device's stored (desired, desired_etag)."""
    with db.sessions() as s:
        return {d.device_id: (d.desired, d.desired_etag) for d in s.scalars(select(Device))}


def context(tmp_path: Path) -> Context:
    return Context(BlobStore(tmp_path / "registry"), 60.0, now=1000.0)
