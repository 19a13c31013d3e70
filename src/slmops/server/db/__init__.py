"""Database access shared by the HTTP API and the ``slmops server`` CLI.

Keyword-only functions taking the session, so a route and a CLI command that create a token
run the same code. Routes own their read queries; what both sides need lives here.
Modules: ``models`` (tables), ``session`` (engine, pragmas, migrations), ``migrations/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import select, update
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


def find_enrollment_token(session: Session, *, secret: str) -> EnrollmentToken | None:
    """The enrollment token for ``secret`` whether expired or not (callers say which)."""
    return session.scalar(
        select(EnrollmentToken).where(
            EnrollmentToken.token_hash == hash_secret(secret, TokenKind.ENROLLMENT)
        )
    )


def count_enrollment_use(session: Session, *, token_id: str) -> None:
    """Increment ``uses`` in SQL, so concurrent enrollments in other processes all count."""
    session.execute(
        update(EnrollmentToken)
        .where(EnrollmentToken.id == token_id)
        .values(uses=EnrollmentToken.uses + 1)
    )


def is_expired(token: EnrollmentToken, *, now: datetime | None = None) -> bool:
    return as_utc(token.expires_at) <= (now or utcnow())


def find_device(session: Session, *, device_id: str) -> Device | None:
    return session.scalar(select(Device).where(Device.device_id == device_id))


def find_device_by_credential(session: Session, *, secret: str) -> Device | None:
    return session.scalar(
        select(Device).where(Device.credential_hash == hash_secret(secret, TokenKind.DEVICE))
    )


__all__ = [
    "Issued",
    "count_enrollment_use",
    "create_api_token",
    "create_enrollment_token",
    "find_api_token",
    "find_device",
    "find_device_by_credential",
    "find_enrollment_token",
    "is_expired",
]
