"""Enrollment tokens (operator): reusable until they expire, scoped to labels.

A device presenting one at ``POST /device/v1/enroll`` gets the token's labels as operator
labels, so whoever holds the token can only enroll devices into that scope.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, status
from pydantic import Field
from sqlalchemy import select

from slmops.core.config import StrictModel
from slmops.server.api.deps import Labels, OperatorDep, SessionDep, ViewerDep
from slmops.server.db import create_enrollment_token, is_expired
from slmops.server.db.models import EnrollmentToken, as_utc, utcnow

router = APIRouter(prefix="/enrollment-tokens", tags=["enrollment-tokens"])

MAX_TTL_SECONDS = 366 * 24 * 3600


class EnrollmentTokenCreate(StrictModel):
    labels: Labels = Field(default_factory=dict)
    expires_in_seconds: int = Field(7 * 24 * 3600, gt=0, le=MAX_TTL_SECONDS)


class EnrollmentTokenPublic(StrictModel):
    id: str
    labels: dict[str, str]
    created_at: datetime
    expires_at: datetime
    expired: bool
    uses: int

    @classmethod
    def of(cls, row: EnrollmentToken) -> EnrollmentTokenPublic:
        return cls(
            id=row.id,
            labels=row.labels,
            created_at=as_utc(row.created_at),
            expires_at=as_utc(row.expires_at),
            expired=is_expired(row),
            uses=row.uses,
        )


class EnrollmentTokenCreated(EnrollmentTokenPublic):
    token: str = Field(description="the secret; shown this once, give it to the devices")


class EnrollmentTokensPublic(StrictModel):
    data: list[EnrollmentTokenPublic]
    count: int


@router.post("", status_code=status.HTTP_201_CREATED)
def create_enrollment(
    body: EnrollmentTokenCreate, session: SessionDep, _caller: OperatorDep
) -> EnrollmentTokenCreated:
    expires_at = utcnow() + timedelta(seconds=body.expires_in_seconds)
    issued = create_enrollment_token(session, labels=body.labels, expires_at=expires_at)
    return EnrollmentTokenCreated(
        **EnrollmentTokenPublic.of(issued.row).model_dump(), token=issued.secret
    )


@router.get("")
def read_enrollment_tokens(session: SessionDep, _caller: ViewerDep) -> EnrollmentTokensPublic:
    rows = session.scalars(select(EnrollmentToken).order_by(EnrollmentToken.created_at)).all()
    return EnrollmentTokensPublic(data=[EnrollmentTokenPublic.of(r) for r in rows], count=len(rows))
