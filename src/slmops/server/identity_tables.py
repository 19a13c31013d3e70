"""Enrollment requests: a re-enrollment of a known device id that waits for an operator.

A request is made when someone presents a valid enrollment token for a device id that already
exists but cannot prove to be that device (no current credential). The existing device keeps
its credential; the requester gets a *pending* credential whose digest is stored here and which
starts working only when an operator approves the request (``slmops devices approve``), which
moves the digest onto the device. Rejected requests are kept (with who decided and when), so
the same pending credential is refused for good. Modelled on Mender's accept/reject of
authentication sets.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from slmops.server.db.base import Base, Tz, utcnow


class RequestStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"  # a newer request for the same device replaced it


class EnrollmentRequest(Base):
    """One re-enrollment waiting for (or decided by) an operator."""

    __tablename__ = "enrollment_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    device_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("devices.device_id", ondelete="CASCADE"), index=True
    )
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    token_id: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(128))
    inventory: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.PENDING.value)
    created_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(Tz, nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
