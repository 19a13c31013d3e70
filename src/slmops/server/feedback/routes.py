"""Operator routes of the feedback loop: rule sets, alert actions and improvement jobs.

Rule sets are applied like blueprints (``slmops apply -f rules.yaml``: PUT, idempotent).
Improvement jobs are run by workers (``slmops improve-worker``, which has the ML stack, the
original model and the signing key, none of which the control plane holds): a worker claims the
oldest queued job (an atomic update, so two workers never take the same one), runs it, pushes the
candidate bundle to this registry and posts the result. A passing result moves the job's
blueprint to the new version, which creates a rollout: waiting for an operator's ``start``
(``start: manual``) or started at once; the job records the rollout, linking it to the alert.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from slmops.server.api.deps import (
    IdPath,
    IdQuery,
    OperatorDep,
    ServicesDep,
    SessionDep,
    ViewerDep,
)
from slmops.server.blueprints.document import Blueprint
from slmops.server.blueprints.service import (
    Conflict,
    SettleFailed,
    apply_blueprint,
    find_blueprint,
)
from slmops.server.db.models import as_utc, utcnow
from slmops.server.db.session import Database
from slmops.server.errors import api_error
from slmops.server.feedback.engine import next_version
from slmops.server.feedback.rules import FeedbackRules
from slmops.server.feedback.schemas import (
    ActionList,
    ActionPublic,
    ClaimBody,
    JobList,
    JobPublic,
    ResultBody,
    RulesPublic,
)
from slmops.server.feedback.tables import AlertAction, FeedbackRulesRow, ImprovementJob
from slmops.server.feedback.webhooks import public_detail
from slmops.server.openapi import errors
from slmops.server.registry.tables import RegistryTag
from slmops.server.security import Role
from slmops.server.targets import to_blueprint

router = APIRouter(tags=["feedback"])


def _rules_public(row: FeedbackRulesRow, changed: bool | None = None) -> RulesPublic:
    doc = {"apiVersion": "slmops/v1", "kind": "FeedbackRules", "metadata": {"name": row.name}}
    return RulesPublic(
        name=row.name,
        generation=row.generation,
        updated_at=as_utc(row.updated_at),
        document=doc | {"spec": row.spec},
        changed=changed,
    )


def _job_public(job: ImprovementJob) -> JobPublic:
    data = {c: getattr(job, c) for c in JobPublic.model_fields if hasattr(job, c)}
    data["created_at"], data["updated_at"] = as_utc(job.created_at), as_utc(job.updated_at)
    return JobPublic(**data)


@router.put("/feedback-rules/{name}")
def apply_rules(
    name: str, body: FeedbackRules, session: SessionDep, _caller: OperatorDep
) -> RulesPublic:
    if body.metadata.name != name:
        raise api_error(
            422,
            "invalid_request",
            f"metadata.name {body.metadata.name!r} differs from the URL's {name!r}",
            where="body.metadata.name",
        )
    spec = body.spec.model_dump(mode="json", exclude_none=True)
    row = session.get(FeedbackRulesRow, name)
    changed = row is None or row.spec != spec
    if row is None:
        row = FeedbackRulesRow(name=name, spec=spec, generation=1, updated_at=utcnow())
        session.add(row)
    elif changed:
        row.spec, row.generation, row.updated_at = spec, row.generation + 1, utcnow()
    session.commit()
    return _rules_public(row, changed)


@router.get("/feedback-rules")
def read_rules(session: SessionDep, _caller: ViewerDep) -> list[RulesPublic]:
    return [_rules_public(r) for r in session.scalars(select(FeedbackRulesRow))]


@router.delete("/feedback-rules/{name}", status_code=204, responses=errors(404))
def delete_rules(name: str, session: SessionDep, _caller: OperatorDep) -> Response:
    row = session.get(FeedbackRulesRow, name)
    if row is None:
        raise api_error(404, "not_found", f"no feedback rules {name!r}", where="name")
    session.delete(row)
    session.commit()
    return Response(status_code=204)


@router.get("/alert-actions")
def read_alert_actions(
    session: SessionDep, caller: ViewerDep, alert_id: IdQuery = None
) -> ActionList:
    """What rules did; a viewer sees a webhook's outcome (sent/failed), an operator its answer."""
    full = Role(caller.role).allows(Role.OPERATOR)
    query = select(AlertAction).order_by(AlertAction.id.desc()).limit(500)
    if alert_id is not None:
        query = query.where(AlertAction.alert_id == alert_id)
    return ActionList(
        data=[
            ActionPublic(
                alert_id=a.alert_id,
                rule=a.rule,
                action=a.action,
                ok=a.ok,
                detail=a.detail if full else public_detail(a.action, a.ok, a.detail),
                job_id=a.job_id,
                created_at=as_utc(a.created_at),
            )
            for a in session.scalars(query)
        ]
    )


@router.get("/jobs")
def read_jobs(session: SessionDep, _caller: ViewerDep, status: str | None = None) -> JobList:
    query = select(ImprovementJob).order_by(ImprovementJob.id.desc()).limit(500)
    if status:
        query = query.where(ImprovementJob.status == status)
    return JobList(data=[_job_public(j) for j in session.scalars(query)])


def _job_or_404(session: Session, job_id: int) -> ImprovementJob:
    job = session.get(ImprovementJob, job_id)
    if job is None:
        raise api_error(404, "not_found", f"no improvement job {job_id}", where="job_id")
    return job


@router.get("/jobs/{job_id}", responses=errors(404))
def read_job(job_id: IdPath, session: SessionDep, _caller: ViewerDep) -> JobPublic:
    return _job_public(_job_or_404(session, job_id))


@router.post("/jobs/claim", responses={204: {"description": "no queued job"}})
def claim_job(body: ClaimBody, session: SessionDep, _caller: OperatorDep) -> Response:
    """Take the oldest queued job; the answer names the version the candidate must be pushed as."""
    for job_id in session.scalars(
        select(ImprovementJob.id)
        .where(ImprovementJob.status == "queued")
        .order_by(ImprovementJob.id)
    ).all():
        taken = session.execute(
            update(ImprovementJob)
            .where(ImprovementJob.id == job_id, ImprovementJob.status == "queued")
            .values(status="running", worker=body.worker, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if getattr(taken, "rowcount", 0) != 1:
            session.rollback()
            continue
        job = session.get(ImprovementJob, job_id, populate_existing=True)
        assert job is not None
        try:
            job.new_version = next_version(session, job.model, job.version)
        except ValueError as exc:  # failed, not left queued: it would block every later job
            job.status, job.result = "failed", {"error": str(exc)}
            session.commit()
            continue
        session.commit()
        return Response(_job_public(job).model_dump_json(), media_type="application/json")
    return Response(status_code=204)


@router.post("/jobs/{job_id}/result", responses=errors(404, 409))
def job_result(
    job_id: IdPath,
    body: ResultBody,
    request: Request,
    session: SessionDep,
    services: ServicesDep,
    caller: OperatorDep,
) -> JobPublic:
    """Record a worker's result; a passing one proposes the rollout of the new version."""
    job = _job_or_404(session, job_id)
    if job.status != "running":
        raise api_error(
            409, "conflict", f"job {job_id} is {job.status}, not running", where="job_id"
        )
    job.result = {"detail": body.detail, "candidate": body.candidate}
    job.updated_at = utcnow()
    if not body.ok:
        job.status = "rejected" if body.candidate else "failed"
        session.commit()
        return _job_public(job)
    version = body.new_version or job.new_version
    tag = session.scalar(
        select(RegistryTag).where(RegistryTag.repository == job.model, RegistryTag.tag == version)
    )
    if tag is None:
        raise api_error(
            422,
            "invalid_request",
            f"{job.model}:{version} is not in the registry",
            where="new_version",
            hint="push the candidate bundle before posting the result",
        )
    row = find_blueprint(session, job.blueprint)
    if row is None:
        job.status, job.result = "failed", job.result | {"error": "the blueprint is gone"}
        session.commit()
        return _job_public(job)
    bp = to_blueprint(row)
    spec = bp.spec.model_copy(deep=True)
    spec.model = spec.model.model_copy(update={"version": version, "channel": None})
    spec.rollout = spec.rollout.model_copy(update={"start": job.start})
    new = Blueprint.model_validate(
        bp.model_dump(mode="json") | {"spec": spec.model_dump(mode="json")}
    )
    job.new_version = version
    actor = f"job:{job.id} ({caller.name})"
    lease = services.settings.settle_lease_seconds
    db: Database = request.app.state.db
    try:
        done = apply_blueprint(
            session,
            new,
            actor=actor,
            contexts=services.context,
            lease_seconds=lease,
            sessions=db.sessions,
        )
        rollout, error = done.rollout or "", None
    except SettleFailed as failed:  # the blueprint pins the candidate; the server retries
        rollout, error = "", failed.row.settle_error
    except Conflict:
        raise api_error(
            409,
            "conflict",
            f"blueprint {row.name!r} was changed or deleted by other requests meanwhile",
            where=f"job {job_id}",
            hint="post the result again",
        ) from None
    job = _job_or_404(session, job_id)
    job.status, job.rollout_id, job.updated_at = "proposed", rollout, utcnow()
    if error is not None:
        job.result = (job.result or {}) | {"settle_error": error}
    session.commit()
    return _job_public(job)
