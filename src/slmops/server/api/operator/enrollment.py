"""Enrollment tokens (operator): reusable until they expire or are revoked, scoped to labels.

A device presenting one at ``POST /device/v1/enroll`` gets the token's labels as operator
labels, so whoever holds the token can only enroll devices into that scope. Every token expires:
its lifetime is at most ``enrollment_token_max_seconds`` (default 30 days), because a reusable
secret that lives forever ends up in images, wikis and chat logs. Revoking one refuses further
enrollments at once; devices it already enrolled are not affected (they have credentials).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, status
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.core.config import StrictModel
from slmops.server.api.deps import Labels, OperatorDep, SessionDep, SettingsDep, ViewerDep
from slmops.server.audit import Actor, record
from slmops.server.db import create_enrollment_token, is_expired
from slmops.server.db.models import EnrollmentToken, as_utc, utcnow
from slmops.server.errors import api_error
from slmops.server.openapi import errors

router = APIRouter(prefix="/enrollment-tokens", tags=["enrollment-tokens"])

MAX_TTL_SECONDS = 366 * 24 * 3600


def check_lifetime(seconds: int | None, max_seconds: int) -> int:
    """The lifetime if allowed; a ValueError saying why not (shared with the CLI)."""
    if seconds is None or seconds <= 0:
        raise ValueError(
            "enrollment tokens must expire; give a lifetime of at most "
            f"{max_seconds} s ({max_seconds / 86400:g} days)"
        )
    if seconds > max_seconds:
        raise ValueError(
            f"a lifetime of {seconds} s ({seconds / 86400:g} days) is longer than the maximum "
            f"of {max_seconds} s ({max_seconds / 86400:g} days) set by the server "
            "(SLMOPS_ENROLLMENT_TOKEN_MAX_SECONDS)"
        )
    return seconds


class EnrollmentTokenCreate(StrictModel):
    labels: Labels = Field(default_factory=dict)
    expires_in_seconds: int | None = Field(
        7 * 24 * 3600,
        le=MAX_TTL_SECONDS,
        strict=True,
        description="lifetime; required, at most the server's enrollment_token_max_seconds",
    )


class EnrollmentTokenPublic(StrictModel):
    id: str
    labels: dict[str, str]
    created_at: datetime
    expires_at: datetime
    expired: bool
    revoked_at: datetime | None = None
    uses: int

    @classmethod
    def of(cls, row: EnrollmentToken) -> EnrollmentTokenPublic:
        return cls(
            id=row.id,
            labels=row.labels,
            created_at=as_utc(row.created_at),
            expires_at=as_utc(row.expires_at),
            expired=is_expired(row),
            revoked_at=as_utc(row.revoked_at) if row.revoked_at else None,
            uses=row.uses,
        )


class EnrollmentTokenCreated(EnrollmentTokenPublic):
    token: str = Field(description="the secret; shown this once, give it to the devices")


class EnrollmentTokensPublic(StrictModel):
    data: list[EnrollmentTokenPublic]
    count: int


@router.post("", status_code=status.HTTP_201_CREATED)
def create_enrollment(
    body: EnrollmentTokenCreate, session: SessionDep, settings: SettingsDep, caller: OperatorDep
) -> EnrollmentTokenCreated:
    try:
        seconds = check_lifetime(body.expires_in_seconds, settings.enrollment_token_max_seconds)
    except ValueError as exc:
        raise api_error(
            422,
            "invalid_lifetime",
            str(exc),
            where="expires_in_seconds",
            hint="create a shorter-lived token and create a new one when it expires",
        ) from None
    expires_at = utcnow() + timedelta(seconds=seconds)
    issued = create_enrollment_token(session, labels=body.labels, expires_at=expires_at)
    record(
        session,
        Actor.operator(caller),
        "enrollment-token.create",
        f"enrollment-token/{issued.row.id}",
        labels=dict(body.labels) or None,
        expires_at=expires_at.isoformat(),
    )
    session.commit()
    return EnrollmentTokenCreated(
        **EnrollmentTokenPublic.of(issued.row).model_dump(), token=issued.secret
    )


@router.get("")
def read_enrollment_tokens(session: SessionDep, _caller: ViewerDep) -> EnrollmentTokensPublic:
    rows = session.scalars(select(EnrollmentToken).order_by(EnrollmentToken.created_at)).all()
    return EnrollmentTokensPublic(data=[EnrollmentTokenPublic.of(r) for r in rows], count=len(rows))


def revoke_token(session: Session, token_id: str, actor: Actor) -> EnrollmentToken | None:
    """Mark the token revoked (idempotent) and audit it; the caller commits. None: unknown id."""
    row = session.get(EnrollmentToken, token_id)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record(session, actor, "enrollment-token.revoke", f"enrollment-token/{token_id}")
    return row


@router.post("/{token_id}/revoke", responses=errors(404))
def revoke_enrollment(
    token_id: str, session: SessionDep, caller: OperatorDep
) -> EnrollmentTokenPublic:
    row = revoke_token(session, token_id, Actor.operator(caller))
    if row is None:
        raise api_error(
            404,
            "not_found",
            f"no enrollment token {token_id!r}",
            where="token_id",
            hint="list them with GET /api/v1/enrollment-tokens",
        )
    session.commit()
    return EnrollmentTokenPublic.of(row)
