"""GET /api/v1/audit: the identity audit log, newest first, for operators and admins.

Viewers are refused (403): entries name tokens, requests and devices, which is more than a
read-only dashboard user needs. Paging is by id (``before``), which stays stable while new
entries arrive.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select

from slmops.core.config import StrictModel
from slmops.server.api.deps import OperatorDep, SessionDep
from slmops.server.audit import AuditEntry
from slmops.server.db.models import as_utc

router = APIRouter(prefix="/audit", tags=["audit"])

INT64_MAX = 2**63 - 1


class AuditPublic(StrictModel):
    id: int
    at: datetime
    actor_kind: str
    actor: str
    role: str | None
    action: str
    target: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, row: AuditEntry) -> AuditPublic:
        return cls(
            id=row.id,
            at=as_utc(row.at),
            actor_kind=row.actor_kind,
            actor=row.actor,
            role=row.role,
            action=row.action,
            target=row.target,
            detail=row.detail or {},
        )


class AuditListPublic(StrictModel):
    data: list[AuditPublic]
    count: int


@router.get("")
def read_audit(
    session: SessionDep,
    _caller: OperatorDep,
    target: Annotated[str | None, Query(max_length=256, description="e.g. device/edge-1")] = None,
    action: Annotated[str | None, Query(max_length=64, description="e.g. device.revoke")] = None,
    before: Annotated[int | None, Query(ge=1, le=INT64_MAX, description="ids below this")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditListPublic:
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if target is not None:
        query = query.where(AuditEntry.target == target)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    rows = session.scalars(query).all()
    return AuditListPublic(data=[AuditPublic.of(r) for r in rows], count=len(rows))
