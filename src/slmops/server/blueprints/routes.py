"""Blueprints as operators apply them: PUT is idempotent like ``kubectl apply``.

PUT /blueprints/{name} stores the document (``service.apply_blueprint``); when
the version it resolves to differs from the one its devices run, it creates a rollout
(``server/reconcile.reconcile``) that moves them in waves, and the answer names it. Other
changes (generation settings, groups) reach devices at once. Applying the same spec again
answers ``changed: false`` and touches nothing, so CI can apply on every run. The body is
validated with the Blueprint model (unknown keys refused), and errors use the usual envelope
naming the key, e.g. ``body.spec.modle``. DELETE aborts its active rollout and resets the
devices it governed to "keep what runs" unless another blueprint now governs them.

Over a big fleet the settle takes about a minute (100,000 devices), longer than a proxy lets a
request run: with ``Prefer: respond-async`` (RFC 7240) the settle runs in a thread of this
process (``settling.py``; the ticker's leader finishes it if this process dies) and the answer
waits for it at most ``wait=N`` seconds (another preference; default 0). Settled in time: the
usual 200. Not yet: 202 with ``Location`` naming the blueprint, and the caller polls GET until
``settled_generation`` equals ``generation``; ``settled_rollout`` is the rollout it created.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.server.api.deps import OperatorDep, ServicesDep, SessionDep, ViewerDep
from slmops.server.blueprints import service
from slmops.server.blueprints.document import Blueprint
from slmops.server.blueprints.schemas import ApplyResult, BlueprintList, BlueprintPublic
from slmops.server.blueprints.settling import rollout_of, settle_in_background, settling
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.db.models import as_utc
from slmops.server.db.session import Database
from slmops.server.desired import governed
from slmops.server.errors import api_error
from slmops.server.openapi import errors
from slmops.server.targets import to_blueprint

router = APIRouter(prefix="/blueprints", tags=["blueprints"])


def _public(row: BlueprintRow) -> BlueprintPublic:
    return BlueprintPublic(
        name=row.name,
        generation=row.generation,
        stable_version=row.stable_version,
        settled_generation=row.settled_generation,
        settling=settling(row),
        settled_rollout=row.settled_rollout,
        settle_error=row.settle_error,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        document=to_blueprint(row).model_dump(mode="json"),
    )


MAX_WAIT = 60.0  # a waiting answer holds one of the threadpool's ~40 threads


def async_wait(request: Request) -> float | None:
    """None when no ``Prefer`` header asks for ``respond-async``, else how long the answer may
    wait for the settle: its ``wait`` preference (seconds, at most ``MAX_WAIT``), 0 without
    one. RFC 7240: preferences may come in several ``Prefer`` lines, comma-separated, each
    ``name[=value]`` maybe followed by ``;`` parameters, names case-insensitive; a preference
    not understood is ignored."""
    asked, wait = False, 0.0
    for line in request.headers.getlist("prefer"):
        for pref in line.split(","):
            token, _, value = pref.split(";", 1)[0].partition("=")
            token, value = token.strip().lower(), value.strip().strip('"')
            if token == "respond-async":
                asked = True
            elif token == "wait" and value.isascii() and value.isdigit():
                wait = min(float(value), MAX_WAIT)
    return wait if asked else None


def _settle_failed(row: BlueprintRow) -> HTTPException:
    return api_error(
        500,
        "settle_failed",
        f"blueprint {row.name!r} generation {row.generation} was stored, but settling it "
        f"(creating its rollout, re-governing its devices) failed: {row.settle_error}",
        where=f"blueprint {row.name}",
        hint="the control plane retries it every SLMOPS_SETTLE_LEASE_SECONDS; see its log for "
        "the cause, or apply a corrected spec",
    )


@router.put(
    "/{name}",
    responses={
        202: {
            "model": ApplyResult,
            "description": "asked with Prefer: respond-async and the spec changed: stored, "
            "settling after the answer (watch settled_generation)",
        },
        **errors(409, 500),
    },
)
def apply_blueprint(
    name: str,
    body: Blueprint,
    request: Request,
    response: Response,
    session: SessionDep,
    services: ServicesDep,
    caller: OperatorDep,
    prefer: Annotated[
        str | None,
        Header(description="respond-async[, wait=N]: answer 202 unless settled in N seconds"),
    ] = None,
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
    lease = services.settings.settle_lease_seconds
    wait = async_wait(request)
    db: Database = request.app.state.db
    try:
        done = service.apply_blueprint(
            session,
            body,
            actor=caller.name,
            contexts=services.context,
            lease_seconds=lease,
            wait=wait is None,
            sessions=db.sessions,
        )
    except service.SettleFailed as failed:
        raise _settle_failed(failed.row) from None
    except service.Conflict:
        raise api_error(
            409,
            "conflict",
            f"blueprint {name!r} was changed or deleted by other requests meanwhile",
            where="name",
            hint="read it again (GET) and re-apply",
        ) from None
    row, generation = done.row, done.row.generation
    if row.settled_generation >= generation:  # settled (or unchanged and settled already)
        public = _public(row).model_dump()
        return ApplyResult(
            **public, changed=done.changed, devices=done.devices, rollout=done.rollout
        )
    waited = False
    if wait is not None and done.token is not None:  # this apply holds the lease: settle it
        waited = wait > 0
        settle_in_background(
            db.sessions,
            name,
            done.token,
            actor=caller.name,
            contexts=services.context,
            lease_seconds=lease,
            wait=wait,
        )
        latest = service.find_fresh(session, name)
        session.commit()
        if latest is None:
            raise api_error(
                409, "conflict", f"blueprint {name!r} was deleted meanwhile", where="name"
            )
        row = latest
        if row.settled_generation >= generation:
            public = _public(row).model_dump()
            devices = governed(session).get(name, 0)
            rollout = rollout_of(row, generation)
            return ApplyResult(**public, changed=done.changed, devices=devices, rollout=rollout)
        if row.settle_error:
            raise _settle_failed(row)
    # not settled yet: asked asynchronously, or settling elsewhere longer than a request waits
    response.status_code = status.HTTP_202_ACCEPTED
    response.headers["Location"] = f"/api/v1/blueprints/{name}"
    if wait is not None:
        applied = "respond-async" + (f", wait={int(wait)}" if waited else "")
        response.headers["Preference-Applied"] = applied
    public = _public(row).model_dump()
    return ApplyResult(**public, changed=done.changed, devices=None, rollout=None)


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


@router.delete("/{name}", status_code=204, responses=errors(404, 409))
def delete_blueprint(
    name: str, session: SessionDep, services: ServicesDep, caller: OperatorDep
) -> None:
    row = _get_or_404(session, name)
    try:
        service.delete_blueprint(
            session,
            row,
            actor=caller.name,
            ctx=services.context(),
            lease_seconds=services.settings.settle_lease_seconds,
        )
    except service.Settling:
        raise api_error(
            409,
            "settling",
            f"blueprint {name!r} is being settled (generation {row.generation}; settled "
            f"{row.settled_generation}): deleting it now could leave its new rollout behind",
            where="name",
            hint=f"retry when GET /api/v1/blueprints/{name} says settling: false",
        ) from None
