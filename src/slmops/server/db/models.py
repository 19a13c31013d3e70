"""Tables of the control plane (SQLAlchemy 2 typed mappings).

Only portable column types (String, Integer, Boolean, Text, JSON, DateTime with time zone),
so one Alembic history serves SQLite and PostgreSQL. Secrets are stored as digests only
(see ``server/security.py``). JSON columns are always replaced, never mutated in place, so
SQLAlchemy notices the change without mutable-tracking wrappers.

Label columns on ``devices``: ``labels`` is what the agent reports at every check-in;
``operator_labels`` is set by operators and by the enrollment token's scope, and wins over
the reported ones, so a device cannot leave the scope it was enrolled into.

``device_actions`` is each device's last reported action per (rollout, version), written at
check-in and with telemetry; the rollout tables themselves (``rollouts``, ``rollout_devices``)
are in ``rollouts/tables.py``.

``Base``, ``Tz``, ``utcnow`` and ``as_utc`` live in ``db/base.py`` (re-exported here for the
many callers of ``utcnow``); the other domains' tables are in their packages, and
``db/metadata.py`` gathers them all for Alembic.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from slmops.server.db.base import Base as Base
from slmops.server.db.base import Tz as Tz
from slmops.server.db.base import as_utc as as_utc
from slmops.server.db.base import utcnow as utcnow


class ApiToken(Base):
    """An operator API token (``slmops server token create`` or POST /api/v1/tokens)."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class EnrollmentToken(Base):
    """A reusable, expiring enrollment token whose labels scope the devices it enrolls."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(Tz)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    revoked_at: Mapped[datetime | None] = mapped_column(Tz, nullable=True)


def merged_labels(
    labels: dict[str, str] | None, operator_labels: dict[str, str] | None
) -> dict[str, str]:
    """A device's effective labels: reported ones overridden by operator (and
    enrollment-scope) labels. A function as well as ``Device.effective_labels``, for reads
    that select the two columns without loading whole rows."""
    return {**(labels or {}), **(operator_labels or {})}


class Device(Base):
    """One enrolled device: its credential digest, labels, inventory, models and desired state."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    operator_labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    inventory: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    profile: Mapped[str | None] = mapped_column(String(128), nullable=True)
    enrolled_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(Tz, nullable=True)
    active: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    previous: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    desired: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    desired_etag: Mapped[str | None] = mapped_column(String(80), nullable=True)
    # "active", or "revoked" (credential replaced by an unknown one; back only by approval)
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")

    @property
    def effective_labels(self) -> dict[str, str]:
        return merged_labels(self.labels, self.operator_labels)


class DeviceAction(Base):
    """A device's last reported status for one (rollout, version); ``rollout_id`` '' = none."""

    __tablename__ = "device_actions"
    __table_args__ = (
        UniqueConstraint("device_id", "rollout_id", "version", name="uq_device_actions_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("devices.device_id", ondelete="CASCADE"), index=True
    )
    rollout_id: Mapped[str] = mapped_column(String(64), default="")
    version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
