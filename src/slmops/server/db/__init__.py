"""Database access shared by the HTTP API and the ``slmops server`` CLI.

Keyword-only functions taking the session, so a route and a CLI command that create a token
run the same code. Routes own their read queries; what both sides need lives here.
Modules: ``models`` (tables), ``session`` (engine, pragmas, migrations), ``migrations/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from slmops.server.db.models import ApiToken, Device, EnrollmentToken, as_utc, utcnow
from slmops.server.security import Role, TokenKind, hash_secret, new_id, new_secret

T = TypeVar("T")


@dataclass(frozen=True)
class Issued(Generic[T]):
    """A freshly created row together with its secret, which is shown this once only."""

    row: T
    secret: str


def create_api_token(session: Session, *, name: str, role: Role) -> Issued[ApiToken]:
    secret = new_secret(TokenKind.API)
    row = ApiToken(
        id=new_id("tok"),
        name=name,
        role=role.value,
        token_hash=hash_secret(secret, TokenKind.API),
        created_at=utcnow(),
        revoked=False,
    )
    session.add(row)
    session.commit()
    return Issued(row, secret)


def find_api_token(session: Session, *, secret: str) -> ApiToken | None:
    """The live (not revoked) operator token for ``secret``, if any."""
    return session.scalar(
        select(ApiToken).where(
            ApiToken.token_hash == hash_secret(secret, TokenKind.API),
            ApiToken.revoked.is_(False),
        )
    )


def create_enrollment_token(
    session: Session, *, labels: dict[str, str], expires_at: datetime
) -> Issued[EnrollmentToken]:
    secret = new_secret(TokenKind.ENROLLMENT)
    row = EnrollmentToken(
        id=new_id("enr"),
        token_hash=hash_secret(secret, TokenKind.ENROLLMENT),
        labels=dict(labels),
        created_at=utcnow(),
        expires_at=expires_at,
        uses=0,
    )
    session.add(row)
    session.commit()
    return Issued(row, secret)


@dataclass(frozen=True)
class TokenView:
    """What enrollment reads of an enrollment token (a Core row: no ORM identity to track)."""

    id: str
    labels: dict[str, str]
    expires_at: datetime
    revoked_at: datetime | None


# Built once; executed on the session's connection, so the ORM's per-statement work is skipped.
_TOKEN_VIEW = select(
    EnrollmentToken.id,
    EnrollmentToken.labels,
    EnrollmentToken.expires_at,
    EnrollmentToken.revoked_at,
).where(EnrollmentToken.token_hash == bindparam("token_hash"))
_COUNT_USE = (
    update(EnrollmentToken)
    .where(EnrollmentToken.id == bindparam("token_id"))
    .values(uses=EnrollmentToken.uses + 1)
)


def find_enrollment_token(session: Session, *, secret: str) -> TokenView | None:
    """The enrollment token for ``secret`` whether expired or not (callers say which); read
    fresh from the database on every call, so a revocation in any process counts at once."""
    row = (
        session.connection()
        .execute(_TOKEN_VIEW, {"token_hash": hash_secret(secret, TokenKind.ENROLLMENT)})
        .first()
    )
    if row is None:
        return None
    return TokenView(row.id, dict(row.labels or {}), row.expires_at, row.revoked_at)


def count_enrollment_use(session: Session, *, token_id: str) -> None:
    """Increment ``uses`` in SQL (``uses = uses + 1``), so concurrent enrollments in other
    processes all count. On PostgreSQL the row stays locked until the caller commits and every
    enrollment with this token waits for that lock: callers run it as their last statement
    before the commit, so the lock is held for one round trip, not the whole transaction.
    Core, not an ORM bulk update: nothing in the session to synchronise, and a third of an
    enrollment's time went to the ORM's evaluate-and-autoflush around it."""
    session.connection().execute(_COUNT_USE, {"token_id": token_id})


def is_expired(token: EnrollmentToken | TokenView, *, now: datetime | None = None) -> bool:
    return as_utc(token.expires_at) <= (now or utcnow())


def find_device(session: Session, *, device_id: str) -> Device | None:
    return session.scalar(select(Device).where(Device.device_id == device_id))


def find_device_by_credential(session: Session, *, secret: str) -> Device | None:
    return session.scalar(
        select(Device).where(Device.credential_hash == hash_secret(secret, TokenKind.DEVICE))
    )


__all__ = [
    "Issued",
    "TokenView",
    "count_enrollment_use",
    "create_api_token",
    "create_enrollment_token",
    "find_api_token",
    "find_device",
    "find_device_by_credential",
    "find_enrollment_token",
    "is_expired",
]
