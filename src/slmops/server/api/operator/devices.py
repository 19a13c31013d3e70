"""Devices as operators see them: list (with a label selector), read one, set labels.

Effective labels are the reported ones overridden by operator labels (see db/models.py).
Selectors are evaluated in Python over the effective labels rather than in SQL, because JSON
operators differ between SQLite and PostgreSQL; a fleet of thousands fits in one pass, and a
SQL label index can replace this when it does not.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.core.config import StrictModel
from slmops.server.api.deps import (
    LabelKey,
    Labels,
    OperatorDep,
    SessionDep,
    SettingsDep,
    ViewerDep,
)
from slmops.server.db import find_device
from slmops.server.db.models import Device, DeviceAction, as_utc
from slmops.server.desired import Refresher
from slmops.server.errors import api_error
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts import Context, join_if_matching

router = APIRouter(prefix="/devices", tags=["devices"])


class ActionPublic(StrictModel):
    rollout_id: str | None
    version: str
    state: str
    stage: str | None
    detail: str
    updated_at: datetime


class DevicePublic(StrictModel):
    device_id: str
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
    def of(cls, row: Device, actions: list[DeviceAction] | None = None) -> DevicePublic:
        return cls(
            device_id=row.device_id,
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


@router.get("")
def read_devices(
    session: SessionDep,
    _caller: ViewerDep,
    selector: Annotated[str | None, Query(description="label selector: k=v,k2!=v2,k3")] = None,
) -> DevicesPublic:
    reqs = parse_selector(selector or "")
    rows = session.scalars(select(Device).order_by(Device.device_id)).all()
    data = [DevicePublic.of(r) for r in rows if matches(r.effective_labels, reqs)]
    return DevicesPublic(data=data, count=len(data))


@router.get("/{device_id}")
def read_device(device_id: str, session: SessionDep, _caller: ViewerDep) -> DevicePublic:
    device = _get_or_404(session, device_id)
    return DevicePublic.of(device, _actions(session, device_id))


@router.patch("/{device_id}/labels")
def update_device_labels(
    device_id: str,
    body: LabelsUpdate,
    session: SessionDep,
    settings: SettingsDep,
    _caller: OperatorDep,
) -> DevicePublic:
    device = _get_or_404(session, device_id)
    labels = {k: v for k, v in (device.operator_labels or {}).items() if k not in body.remove}
    labels.update(body.set)
    device.operator_labels = labels
    # New labels may put the device under another blueprint (and its rollout): show it now.
    ctx = Context(BlobStore(settings.data_dir), settings.poll_seconds)
    refresher = Refresher(session, ctx.store, poll_seconds=ctx.poll_seconds)
    join_if_matching(refresher, device, ctx)
    refresher.refresh(device)
    session.commit()
    return DevicePublic.of(device, _actions(session, device_id))
