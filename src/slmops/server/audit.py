"""The audit log: who changed which identity, what they did, and when.

Every change to device identity and enrollment tokens (enroll, re-enroll, approve, reject,
revoke, rotate, delete, token create and revoke) is written here *in the same transaction* as
the change itself, so an entry exists exactly when the change does. Rows are only ever
inserted. Operators and admins read it (``GET /api/v1/audit``, ``slmops get audit``); viewers
do not, because entries name tokens, requests and devices an attacker would like to know about.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String
from sqlalchemy.orm import Mapped, Session, mapped_column

from slmops.server.db.base import Base, Tz, utcnow
from slmops.server.db.models import ApiToken


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(Tz, default=utcnow, index=True)
    actor_kind: Mapped[str] = mapped_column(String(16))  # operator, device, enrollment-token, cli
    actor: Mapped[str] = mapped_column(String(128))  # token id, device id, or "local database"
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    action: Mapped[str] = mapped_column(String(64), index=True)  # e.g. device.revoke
    target: Mapped[str] = mapped_column(String(256), index=True)  # e.g. device/edge-1
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


@dataclass(frozen=True)
class Actor:
    """Who did it: an operator token (with its role), a device, an enrollment token, the CLI."""

    kind: str
    id: str
    role: str | None = None

    @classmethod
    def operator(cls, token: ApiToken) -> Actor:
        return cls("operator", token.id, token.role)

    @classmethod
    def device(cls, device_id: str) -> Actor:
        return cls("device", device_id)

    @classmethod
    def enrollment(cls, token_id: str) -> Actor:
        return cls("enrollment-token", token_id)


CLI_ACTOR = Actor("cli", "local database")  # `slmops server ...` writes the database directly


def record(session: Session, actor: Actor, action: str, target: str, **detail: Any) -> AuditEntry:
    """Add one entry to the caller's transaction (the caller commits with its change)."""
    entry = AuditEntry(
        at=utcnow(),
        actor_kind=actor.kind,
        actor=actor.id,
        role=actor.role,
        action=action,
        target=target,
        detail={k: v for k, v in detail.items() if v is not None},
    )
    session.add(entry)
    return entry
