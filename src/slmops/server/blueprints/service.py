"""Blueprint use cases: apply and delete, the same code for every caller.

Operators apply through ``PUT /api/v1/blueprints/{name}`` (``blueprints/routes.py``);
the feedback loop applies a blueprint pinned to a passing candidate
(``feedback/routes.py``). Both go through ``apply_blueprint``, so an apply means one thing:

- an unchanged spec answers ``changed: False`` and touches nothing (CI can apply every run);
- a changed spec is stored (``generation`` + 1; another model forgets the stable version,
  whose versions say nothing about the new model) and then *settled* (``settling.py``):
  ``reconcile`` creates the rollout when the resolved version differs, and ``settle``
  re-governs devices and recomputes their desired state. By default the apply settles before
  it answers; with ``wait=False`` it answers once the spec is stored and the caller settles in
  the background (``Applied.token``) or leaves it to the process that holds the lease.

``delete_blueprint`` aborts the blueprint's active rollout (moved devices keep what they run)
and settles the devices it governed. No HTTP here: routes check the request and answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from slmops.server.blueprints.document import Blueprint
from slmops.server.blueprints.settling import Contexts, claim, rollout_of, wait_settled
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.context import Context
from slmops.server.db.models import utcnow
from slmops.server.desired import governed
from slmops.server.reconcile import settle, stop_for_blueprint


@dataclass(frozen=True)
class Applied:
    """What an apply did: the stored row, whether the spec changed, how many devices the
    blueprint governs now, and the rollout it created (None: none needed, or not settled yet).
    ``token``: this apply holds the settle lease and has not settled yet (``wait=False``): the
    caller must run ``settle_claimed`` with it."""

    row: BlueprintRow
    changed: bool
    devices: int | None
    rollout: str | None
    token: str | None = None


class Settling(Exception):
    """The blueprint is being settled: a delete now could leave its new rollout behind."""


class Conflict(Exception):
    """Other applies of the same blueprint kept changing it under this one."""


class SettleFailed(Exception):
    """The spec was stored but settling it failed (``row.settle_error`` says why)."""

    def __init__(self, row: BlueprintRow) -> None:
        super().__init__(row.settle_error)
        self.row = row


def find_blueprint(session: Session, name: str) -> BlueprintRow | None:
    return session.scalar(select(BlueprintRow).where(BlueprintRow.name == name))


def find_fresh(session: Session, name: str) -> BlueprintRow | None:
    """``find_blueprint`` read from the database even when the session holds the row already
    (sessions keep objects across commits here)."""
    query = select(BlueprintRow).execution_options(populate_existing=True)
    return session.scalar(query.where(BlueprintRow.name == name))


def _store(
    session: Session, doc: Blueprint, actor: str, lease_seconds: float
) -> tuple[BlueprintRow, bool, str | None]:
    """Store the spec when it changed: (row, changed, lease token). The generation moves with
    ``WHERE generation =`` what was read, so two concurrent applies never store the same
    generation number for two specs (the settler would settle one and count both); the loser
    reads again. An unchanged spec whose generation is not settled (pending, or its settle
    failed: this apply retries it now) claims the lease too. The lease is claimed in the
    commit that stores the spec. Commits."""
    name = doc.metadata.name
    spec = doc.spec.model_dump(mode="json")
    for _ in range(20):
        row = find_fresh(session, name)
        now = utcnow()
        if row is None:
            try:
                with session.begin_nested():  # a concurrent create rolls back only this
                    session.add(
                        BlueprintRow(
                            name=name,
                            spec=spec,
                            generation=1,
                            settled_generation=0,
                            applied_by=actor,
                            created_at=now,
                            updated_at=now,
                        )
                    )
            except IntegrityError:
                continue  # created concurrently: read it and compare
            changed = True
        elif row.spec == spec:
            if row.settled_generation >= row.generation:
                session.commit()
                return row, False, None
            changed = False
            if row.settle_error:  # applied again after a failure: retry now, not a lease later
                row.settle_error, row.settle_failed_at = None, None
        else:
            values: dict[str, Any] = {
                "spec": spec,
                "generation": row.generation + 1,
                "updated_at": now,
                "applied_by": actor,
                "settle_error": None,  # a new spec gets a fresh chance
                "settle_failed_at": None,
            }
            if row.spec.get("model", {}).get("name") != doc.spec.model.name:
                # another model: its versions (and adapters made for them) say nothing about it
                values |= {"stable_version": None, "stable_adapters": None}
            moved = session.execute(
                update(BlueprintRow)
                .where(BlueprintRow.id == row.id, BlueprintRow.generation == row.generation)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if getattr(moved, "rowcount", 0) != 1:
                continue  # another apply stored a generation meanwhile: nothing written here
            changed = True
        token = claim(session, name, lease_seconds)
        session.commit()
        stored = find_fresh(session, name)
        session.commit()
        assert stored is not None
        return stored, changed, token
    raise Conflict(name)


def apply_blueprint(
    session: Session,
    doc: Blueprint,
    *,
    actor: str,
    contexts: Contexts,
    lease_seconds: float,
    wait: bool = True,
    timeout: float = 300.0,
    sessions: sessionmaker[Session] | None = None,
) -> Applied:
    """Create or update the blueprint ``doc`` names (see the module docstring). Commits.

    With ``wait`` it settles before returning: itself when it took the lease, else by waiting
    for the holder (or taking the lease once free) up to ``timeout`` seconds (then the row
    says ``settled_generation < generation``); ``SettleFailed`` when settling failed. With
    ``sessions``, generations other applies stored meanwhile go on in the background."""
    name = doc.metadata.name
    row, changed, token = _store(session, doc, actor, lease_seconds)
    if row.settled_generation >= row.generation:
        return Applied(row, changed, governed(session).get(name, 0), None)
    if not wait:  # counting governed devices reads them all: the settle does that later
        return Applied(row, changed, None, None, token=token)
    generation = row.generation
    latest = wait_settled(
        session,
        name,
        generation,
        actor=actor,
        contexts=contexts,
        lease_seconds=lease_seconds,
        timeout=timeout,
        token=token,
        sessions=sessions,
    )
    if latest is None:
        raise Conflict(name)  # deleted while settling
    if latest.settled_generation < generation:
        if latest.settle_error:
            raise SettleFailed(latest)
        return Applied(latest, changed, None, None)  # still settling elsewhere: see the row
    return Applied(latest, changed, governed(session).get(name, 0), rollout_of(latest, generation))


def delete_blueprint(
    session: Session, row: BlueprintRow, *, actor: str, ctx: Context, lease_seconds: float
) -> None:
    """Delete the blueprint: abort its active rollout, then settle its devices. Commits.

    Takes the settle lease first and holds it to the end, so no apply's settle can create a
    rollout meanwhile that would outlive the blueprint; ``Settling`` when a settle holds it."""
    name = row.name
    token = claim(session, name, lease_seconds)
    if token is None:
        session.rollback()
        raise Settling(name)
    session.commit()
    try:
        stop_for_blueprint(session, name, actor=actor, ctx=ctx)
        session.delete(row)
        session.commit()
    except Exception:  # let go, so a retry (or an apply) is not refused for a lease
        session.rollback()
        session.execute(
            update(BlueprintRow)
            .where(BlueprintRow.name == name, BlueprintRow.settling_by == token)
            .values(settling_until=None, settling_by=None)
        )
        session.commit()
        raise
    settle(session, ctx)
