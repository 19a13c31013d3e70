"""Blueprints as operators apply them: PUT is idempotent like ``kubectl apply``.

PUT /blueprints/{name} stores the document and recomputes every device's desired state at
once (no rollout waves yet); applying the same spec again answers ``changed: false`` and
touches nothing, so CI can apply on every run. The body is validated with the Blueprint model
(unknown keys refused), and errors use the usual envelope naming the key, e.g.
``body.spec.modle``. DELETE resets the devices it governed to "keep what runs" unless another
blueprint now governs them.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.core.config import StrictModel
from slmops.server.api.deps import OperatorDep, SessionDep, SettingsDep, ViewerDep
from slmops.server.blueprint import Blueprint
from slmops.server.blueprints_table import BlueprintRow
from slmops.server.db.models import as_utc, utcnow
from slmops.server.desired import governed, refresh_fleet, to_blueprint
from slmops.server.errors import api_error
from slmops.server.registry.store import BlobStore
from slmops.server.settings import ServerSettings

router = APIRouter(prefix="/blueprints", tags=["blueprints"])


class BlueprintPublic(StrictModel):
    name: str
    generation: int = Field(description="incremented by every apply that changed the spec")
    created_at: datetime
    updated_at: datetime
    document: dict[str, Any] = Field(description="the Blueprint as applied")


class ApplyResult(BlueprintPublic):
    changed: bool
    devices: int = Field(description="devices this blueprint governs now")


class BlueprintList(StrictModel):
    data: list[BlueprintPublic]


def _public(row: BlueprintRow) -> BlueprintPublic:
    return BlueprintPublic(
        name=row.name,
        generation=row.generation,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        document=to_blueprint(row).model_dump(mode="json"),
    )


def _row(session: Session, name: str) -> BlueprintRow | None:
    return session.scalar(select(BlueprintRow).where(BlueprintRow.name == name))


def _refresh(
    session: Session, settings: ServerSettings, released: Blueprint | None
) -> Counter[str]:
    store = BlobStore(settings.data_dir)
    return refresh_fleet(session, store, poll_seconds=settings.poll_seconds, released=released)


@router.put("/{name}")
def apply_blueprint(
    name: str, body: Blueprint, session: SessionDep, settings: SettingsDep, _caller: OperatorDep
) -> ApplyResult:
    """Create or update; unchanged spec → ``changed: false`` and no device is touched."""
    if body.metadata.name != name:
        raise api_error(
            422,
            "invalid_request",
            f"metadata.name {body.metadata.name!r} differs from the URL's {name!r}",
            where="body.metadata.name",
            hint="PUT /api/v1/blueprints/<metadata.name>",
        )
    spec = body.spec.model_dump(mode="json")
    row = _row(session, name)
    previous = to_blueprint(row) if row is not None else None
    changed = row is None or row.spec != spec
    if row is None:
        now = utcnow()
        row = BlueprintRow(name=name, spec=spec, generation=1, created_at=now, updated_at=now)
        session.add(row)
    elif changed:
        row.spec, row.generation, row.updated_at = spec, row.generation + 1, utcnow()
    session.commit()
    counts = _refresh(session, settings, previous) if changed else governed(session)
    return ApplyResult(**_public(row).model_dump(), changed=changed, devices=counts.get(name, 0))


@router.get("")
def read_blueprints(session: SessionDep, _caller: ViewerDep) -> BlueprintList:
    rows = session.scalars(select(BlueprintRow).order_by(BlueprintRow.name))
    return BlueprintList(data=[_public(r) for r in rows])


def _get_or_404(session: Session, name: str) -> BlueprintRow:
    row = _row(session, name)
    if row is None:
        raise api_error(
            404,
            "not_found",
            f"no blueprint {name!r}",
            where="name",
            hint="list them with GET /api/v1/blueprints",
        )
    return row


@router.get("/{name}")
def read_blueprint(name: str, session: SessionDep, _caller: ViewerDep) -> BlueprintPublic:
    return _public(_get_or_404(session, name))


@router.delete("/{name}", status_code=204)
def delete_blueprint(
    name: str, session: SessionDep, settings: SettingsDep, _caller: OperatorDep
) -> None:
    row = _get_or_404(session, name)
    released = to_blueprint(row)
    session.delete(row)
    session.commit()
    _refresh(session, settings, released)
