"""Blueprint use cases: apply and delete, the same code for every caller.

Operators apply through ``PUT /api/v1/blueprints/{name}`` (``blueprints/routes.py``);
the feedback loop applies a blueprint pinned to a passing candidate
(``feedback/routes.py``). Both go through ``apply_blueprint``, so an apply means one thing:

- an unchanged spec answers ``changed: False`` and touches nothing (CI can apply every run);
- a changed spec is stored (``generation`` + 1; another model forgets the stable version,
  whose versions say nothing about the new model), then ``reconcile`` creates the rollout when
  the resolved version differs, and ``settle`` re-governs devices and recomputes their desired
  state.

``delete_blueprint`` aborts the blueprint's active rollout (moved devices keep what they run)
and settles the devices it governed. No HTTP here: routes check the request and answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.server.blueprints.document import Blueprint
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.context import Context
from slmops.server.db.models import utcnow
from slmops.server.desired import governed
from slmops.server.reconcile import reconcile, settle, stop_for_blueprint


@dataclass(frozen=True)
class Applied:
    """What an apply did: the stored row, whether the spec changed, how many devices the
    blueprint governs now, and the rollout it created (None: none needed)."""

    row: BlueprintRow
    changed: bool
    devices: int
    rollout: str | None


def find_blueprint(session: Session, name: str) -> BlueprintRow | None:
    return session.scalar(select(BlueprintRow).where(BlueprintRow.name == name))


def apply_blueprint(session: Session, doc: Blueprint, *, actor: str, ctx: Context) -> Applied:
    """Create or update the blueprint ``doc`` names (see the module docstring). Commits."""
    name = doc.metadata.name
    spec = doc.spec.model_dump(mode="json")
    row = find_blueprint(session, name)
    changed = row is None or row.spec != spec
    if row is None:
        now = utcnow()
        row = BlueprintRow(name=name, spec=spec, generation=1, created_at=now, updated_at=now)
        session.add(row)
    elif changed:
        if row.spec.get("model", {}).get("name") != doc.spec.model.name:
            # another model: its versions (and adapters made for them) say nothing about it
            row.stable_version, row.stable_adapters = None, None
        row.spec, row.generation, row.updated_at = spec, row.generation + 1, utcnow()
    session.commit()
    if not changed:
        return Applied(row, False, governed(session).get(name, 0), None)
    rollout = reconcile(session, row, actor=actor, ctx=ctx)
    counts = settle(session, ctx)
    return Applied(row, True, counts.get(name, 0), rollout)


def delete_blueprint(session: Session, row: BlueprintRow, *, actor: str, ctx: Context) -> None:
    """Delete the blueprint: abort its active rollout, then settle its devices. Commits."""
    name = row.name
    stop_for_blueprint(session, name, actor=actor, ctx=ctx)
    session.delete(row)
    session.commit()
    settle(session, ctx)
