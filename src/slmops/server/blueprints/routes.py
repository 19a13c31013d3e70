"""Blueprints as operators apply them: PUT is idempotent like ``kubectl apply``.

PUT /blueprints/{name} stores the document (``service.apply_blueprint``); when
the version it resolves to differs from the one its devices run, it creates a rollout
(``server/reconcile.reconcile``) that moves them in waves, and the answer names it. Other
changes (generation settings, groups) reach devices at once. Applying the same spec again
answers ``changed: false`` and touches nothing, so CI can apply on every run. The body is validated with the Blueprint model
(unknown keys refused), and errors use the usual envelope naming the key, e.g.
``body.spec.modle``. DELETE aborts its active rollout and resets the devices it governed to
"keep what runs" unless another blueprint now governs them.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.server.api.deps import OperatorDep, ServicesDep, SessionDep, ViewerDep
from slmops.server.blueprints import service
from slmops.server.blueprints.document import Blueprint
from slmops.server.blueprints.schemas import ApplyResult, BlueprintList, BlueprintPublic
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.db.models import as_utc
from slmops.server.errors import api_error
from slmops.server.openapi import errors
from slmops.server.targets import to_blueprint

router = APIRouter(prefix="/blueprints", tags=["blueprints"])


def _public(row: BlueprintRow) -> BlueprintPublic:
    return BlueprintPublic(
        name=row.name,
        generation=row.generation,
        stable_version=row.stable_version,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        document=to_blueprint(row).model_dump(mode="json"),
    )


@router.put("/{name}")
def apply_blueprint(
    name: str, body: Blueprint, session: SessionDep, services: ServicesDep, caller: OperatorDep
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
    done = service.apply_blueprint(session, body, actor=caller.name, ctx=services.context())
    public = _public(done.row).model_dump()
    return ApplyResult(**public, changed=done.changed, devices=done.devices, rollout=done.rollout)


@router.get("")
def read_blueprints(session: SessionDep, _caller: ViewerDep) -> BlueprintList:
    rows = session.scalars(select(BlueprintRow).order_by(BlueprintRow.name))
    return BlueprintList(data=[_public(r) for r in rows])


def _get_or_404(session: Session, name: str) -> BlueprintRow:
    row = service.find_blueprint(session, name)
    if row is None:
        raise api_error(
            404,
            "not_found",
            f"no blueprint {name!r}",
            where="name",
            hint="list them with GET /api/v1/blueprints",
        )
    return row


@router.get("/{name}", responses=errors(404))
def read_blueprint(name: str, session: SessionDep, _caller: ViewerDep) -> BlueprintPublic:
    return _public(_get_or_404(session, name))


@router.delete("/{name}", status_code=204, responses=errors(404))
def delete_blueprint(
    name: str, session: SessionDep, services: ServicesDep, caller: OperatorDep
) -> None:
    row = _get_or_404(session, name)
    service.delete_blueprint(session, row, actor=caller.name, ctx=services.context())
