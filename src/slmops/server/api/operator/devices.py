"""Devices as operators see them: list (with a label selector), read one, set labels, and
their identity lifecycle (approve/reject a pending re-enrollment, revoke, rotate, delete; see
``server/identity.py``). Every identity change is audited; reading needs a viewer token,
changing an operator token.

Effective labels are the reported ones overridden by operator labels (see db/models.py).
Selectors are evaluated in Python over the effective labels rather than in SQL, because JSON
operators differ between SQLite and PostgreSQL; a fleet of thousands fits in one pass, and a
SQL label index can replace this when it does not.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.core.config import StrictModel
from slmops.server import identity
from slmops.server.api.deps import (
    LabelKey,
    Labels,
    OperatorDep,
    ServicesDep,
    SessionDep,
    ViewerDep,
)
from slmops.server.audit import Actor
from slmops.server.db import find_device
from slmops.server.db.models import ApiToken, Device, DeviceAction, as_utc
from slmops.server.desired import Refresher, refresh_devices
from slmops.server.errors import api_error
from slmops.server.identity_tables import EnrollmentRequest
from slmops.server.openapi import errors
from slmops.server.reconcile import join_if_matching

router = APIRouter(prefix="/devices", tags=["devices"])


class ActionPublic(StrictModel):
    rollout_id: str | None
    version: str
    state: str
    stage: str | None
    detail: str
    updated_at: datetime


class RequestPublic(StrictModel):
    id: str
    reason: str
    status: str
    token_id: str
    inventory: dict[str, Any]
    created_at: datetime
    decided_at: datetime | None
    decided_by: str | None

    @classmethod
    def of(cls, row: EnrollmentRequest) -> RequestPublic:
        return cls(
            id=row.id,
            reason=row.reason,
            status=row.status,
            token_id=row.token_id,
            inventory=row.inventory or {},
            created_at=as_utc(row.created_at),
            decided_at=as_utc(row.decided_at) if row.decided_at else None,
            decided_by=row.decided_by,
        )


class DevicePublic(StrictModel):
    device_id: str
    status: str = Field("active", description="active or revoked")
    pending_request: RequestPublic | None = Field(
        None, description="a re-enrollment waiting for approval (slmops devices approve)"
    )
    labels: dict[str, str] = Field(description="effective: reported, overridden by operator")
    reported_labels: dict[str, str]
    operator_labels: dict[str, str]
    inventory: dict[str, Any]
    profile: str | None
    enrolled_at: datetime
    last_seen: datetime | None
    active: dict[str, Any] | None
    previous: dict[str, Any] | None
    desired: dict[str, Any] | None
    actions: list[ActionPublic] = Field(
        default_factory=list, description="action statuses; filled by GET /devices/{id} only"
    )

    @classmethod
    def of(
        cls,
        row: Device,
        actions: list[DeviceAction] | None = None,
        pending: EnrollmentRequest | None = None,
    ) -> DevicePublic:
        return cls(
            device_id=row.device_id,
            status=row.status or identity.ACTIVE,
            pending_request=RequestPublic.of(pending) if pending else None,
            labels=row.effective_labels,
            reported_labels=row.labels or {},
            operator_labels=row.operator_labels or {},
            inventory=row.inventory or {},
            profile=row.profile,
            enrolled_at=as_utc(row.enrolled_at),
            last_seen=as_utc(row.last_seen) if row.last_seen else None,
            active=row.active,
            previous=row.previous,
            desired=row.desired,
            actions=[
                ActionPublic(
                    rollout_id=a.rollout_id or None,
                    version=a.version,
                    state=a.state,
                    stage=a.stage,
                    detail=a.detail,
                    updated_at=as_utc(a.updated_at),
                )
                for a in actions or []
            ],
        )


class DevicesPublic(StrictModel):
    data: list[DevicePublic]
    count: int


class LabelsUpdate(StrictModel):
    set: Labels = Field(default_factory=dict, description="operator labels to add or change")
    remove: list[LabelKey] = Field(default_factory=list, description="operator labels to drop")


Requirement = tuple[str, str, str | None]  # (key, "=" | "!=" | "exists", value)


def parse_selector(text: str) -> list[Requirement]:
    """``k=v,k2!=v2,k3`` into requirements; a bare key means "has this label"."""
    reqs: list[Requirement] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if "!=" in part:
            key, value = part.split("!=", 1)
            reqs.append((key.strip(), "!=", value.strip()))
        elif "=" in part:
            key, value = part.split("=", 1)
            reqs.append((key.strip(), "=", value.strip()))
        else:
            key = part
            reqs.append((key, "exists", None))
        if not key.strip():
            raise api_error(
                422,
                "invalid_selector",
                f"selector term {part!r} has no label key",
                where="selector",
                hint="write k=v,k2!=v2,k3 (k3: the label is present)",
            )
    return reqs


def matches(labels: dict[str, str], reqs: list[Requirement]) -> bool:
    for key, op, value in reqs:
        if op == "exists" and key not in labels:
            return False
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
    return True


def _get_or_404(session: Session, device_id: str) -> Device:
    device = find_device(session, device_id=device_id)
    if device is None:
        raise api_error(
            404,
            "not_found",
            f"no device {device_id!r}",
            where="device_id",
            hint="list devices with GET /api/v1/devices",
        )
    return device


def _actions(session: Session, device_id: str) -> list[DeviceAction]:
    return list(
        session.scalars(
            select(DeviceAction)
            .where(DeviceAction.device_id == device_id)
            .order_by(DeviceAction.updated_at.desc())
        )
    )


def _pending_by_device(session: Session) -> dict[str, EnrollmentRequest]:
    rows = session.scalars(
        select(EnrollmentRequest)
        .where(EnrollmentRequest.status == "pending")
        .order_by(EnrollmentRequest.created_at)
    )
    return {r.device_id: r for r in rows}  # the newest wins (only one is ever pending)


@router.get("")
def read_devices(
    session: SessionDep,
    _caller: ViewerDep,
    selector: Annotated[str | None, Query(description="label selector: k=v,k2!=v2,k3")] = None,
) -> DevicesPublic:
    reqs = parse_selector(selector or "")
    rows = session.scalars(select(Device).order_by(Device.device_id)).all()
    pending = _pending_by_device(session)
    data = [
        DevicePublic.of(r, pending=pending.get(r.device_id))
        for r in rows
        if matches(r.effective_labels, reqs)
    ]
    return DevicesPublic(data=data, count=len(data))


@router.get("/{device_id}", responses=errors(404))
def read_device(device_id: str, session: SessionDep, _caller: ViewerDep) -> DevicePublic:
    device = _get_or_404(session, device_id)
    pending = identity.pending_request(session, device_id)
    return DevicePublic.of(device, _actions(session, device_id), pending)


@router.patch("/{device_id}/labels", responses=errors(404))
def update_device_labels(
    device_id: str,
    body: LabelsUpdate,
    session: SessionDep,
    services: ServicesDep,
    _caller: OperatorDep,
) -> DevicePublic:
    device = _get_or_404(session, device_id)
    labels = {k: v for k, v in (device.operator_labels or {}).items() if k not in body.remove}
    labels.update(body.set)
    device.operator_labels = labels
    # New labels may put the device under another blueprint (and its rollout): show it now.
    ctx = services.context()
    refresher = Refresher(session, ctx.store, poll_seconds=ctx.poll_seconds, targets=ctx.targets)
    join_if_matching(refresher, device, ctx)
    # conditional on the ETag it read, recomputed from a fresh snapshot if another writer won
    refresh_devices(
        session,
        ctx.store,
        poll_seconds=ctx.poll_seconds,
        device_ids={device_id},
        targets=ctx.targets,
    )
    session.commit()
    return DevicePublic.of(device, _actions(session, device_id))


# --- identity lifecycle -----------------------------------------------------------------------


class Decision(StrictModel):
    request_id: str | None = Field(
        None,
        max_length=32,
        description="the request the operator looked at; refused (409) if another is pending now",
    )


class RevokeBody(StrictModel):
    reason: str | None = Field(None, max_length=500)


class IdentityChanged(StrictModel):
    device_id: str
    action: str
    status: str | None = Field(None, description="the device's status afterwards; null: deleted")
    request_id: str | None = None
    rollouts: list[str] = Field(default_factory=list, description="rollouts it was taken out of")


def _pending_or_409(session: Session, device_id: str, body: Decision) -> EnrollmentRequest:
    req = identity.pending_request(session, device_id)
    if req is None:
        raise api_error(
            409,
            "no_pending_request",
            f"device {device_id!r} has no enrollment request waiting",
            where="device_id",
            hint="the device asks by enrolling again; see GET /api/v1/devices/{id}",
        )
    if body.request_id is not None and body.request_id != req.id:
        raise api_error(
            409,
            "request_changed",
            f"request {body.request_id!r} is no longer pending for {device_id!r}; {req.id} is",
            where="request_id",
            hint="look at the device again and decide on the request pending now",
        )
    return req


def _decide(
    device_id: str, body: Decision, session: Session, caller: ApiToken, *, approve: bool
) -> IdentityChanged:
    device = _get_or_404(session, device_id)
    req = _pending_or_409(session, device_id, body)
    identity.decide(session, device, req, Actor.operator(caller), approve=approve)
    session.commit()
    action = "approve" if approve else "reject"
    return IdentityChanged(
        device_id=device_id, action=action, status=device.status, request_id=req.id
    )


@router.post("/{device_id}/approve", responses=errors(404, 409))
def approve_device(
    device_id: str, session: SessionDep, caller: OperatorDep, body: Decision | None = None
) -> IdentityChanged:
    """Accept the pending re-enrollment: its credential becomes the device's (the old dies)."""
    return _decide(device_id, body or Decision(), session, caller, approve=True)


@router.post("/{device_id}/reject", responses=errors(404, 409))
def reject_device(
    device_id: str, session: SessionDep, caller: OperatorDep, body: Decision | None = None
) -> IdentityChanged:
    """Refuse the pending re-enrollment; the device keeps its current credential."""
    return _decide(device_id, body or Decision(), session, caller, approve=False)


@router.post("/{device_id}/revoke", responses=errors(404))
def revoke_device(
    device_id: str,
    session: SessionDep,
    services: ServicesDep,
    caller: OperatorDep,
    body: RevokeBody | None = None,
) -> IdentityChanged:
    """The credential stops working now; the record stays; back only through approval. The
    device leaves every unfinished rollout (its wave is judged without it)."""
    device = _get_or_404(session, device_id)
    reason = (body or RevokeBody()).reason
    touched = identity.revoke(
        session, device, Actor.operator(caller), services.context(), reason=reason
    )
    return IdentityChanged(
        device_id=device_id, action="revoke", status=identity.REVOKED, rollouts=touched
    )


@router.post("/{device_id}/rotate", responses=errors(404))
def rotate_device(device_id: str, session: SessionDep, caller: OperatorDep) -> IdentityChanged:
    """Force a new credential: the current one stops working and the device must re-enroll,
    which an operator approves (the device can rotate on its own: POST /device/v1/credential)."""
    device = _get_or_404(session, device_id)
    identity.rotate_by_operator(session, device, Actor.operator(caller))
    session.commit()
    return IdentityChanged(device_id=device_id, action="rotate", status=device.status)


@router.delete("/{device_id}", status_code=status.HTTP_200_OK, responses=errors(404))
def delete_device(
    device_id: str, session: SessionDep, services: ServicesDep, caller: OperatorDep
) -> IdentityChanged:
    """Decommission: the credential stops working, the record and its actions are removed, and
    the device leaves every unfinished rollout (its wave is judged without it)."""
    device = _get_or_404(session, device_id)
    touched = identity.delete(session, device, Actor.operator(caller), services.context())
    return IdentityChanged(device_id=device_id, action="delete", status=None, rollouts=touched)
