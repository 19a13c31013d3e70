"""Tables of the control plane (SQLAlchemy 2 typed mappings).

Only portable column types (String, Integer, Boolean, Text, JSON, DateTime with time zone),
so one Alembic history serves SQLite and PostgreSQL. Secrets are stored as digests only
(see ``server/security.py``). JSON columns are always replaced, never mutated in place, so
SQLAlchemy notices the change without mutable-tracking wrappers.

Label columns on ``devices``: ``labels`` is what the agent reports at every check-in;
``operator_labels`` is set by operators and by the enrollment token's scope, and wins over
the reported ones, so a device cannot leave the scope it was enrolled into.

``Base``, ``Tz``, ``utcnow`` and ``as_utc`` live in ``db/base.py`` (re-exported here for the
many callers of ``utcnow``); the other domains' tables are in their packages, and
``db/metadata.py`` gathers them all for Alembic.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
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
        """Reported labels overridden by operator (and enrollment-scope) labels."""
        return {**(self.labels or {}), **(self.operator_labels or {})}


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


class Rollout(Base):
    """A rollout's summary: the ``RolloutState`` document without its devices (those are
    ``RolloutDevice`` rows; ``server/rollouts/store.py`` reads and writes both).

    ``revision`` makes writes optimistic: a writer updates ``WHERE revision = <what it read>``
    and retries on a miss, so several API processes (and their tickers) can drive the same
    rollout without one overwriting another's step (``server/rollouts/service.py``).
    """

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(63), index=True, default="")
    model: Mapped[str] = mapped_column(String(128), default="")
    target_version: Mapped[str] = mapped_column(String(64), default="")
    state_json: Mapped[str] = mapped_column(Text)  # the summary: RolloutState without devices
    status: Mapped[str] = mapped_column(String(32), index=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    seq: Mapped[int] = mapped_column(Integer, default=0)  # per blueprint: 1, 2, ... (newest last)
    created_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)


class RolloutDevice(Base):
    """One device's membership in one rollout (hawkBit's Action): its wave, the version it had
    before (the revert target) and what it last reported (``rollout.DeviceRecord``).

    One row per (rollout, device), so a device report reads and writes its own row plus the
    rollout's small summary (``Rollout.state_json``, whose tally counts these rows), never a
    document that grows with the fleet (``server/rollouts/store.py``). ``status`` is the record's
    one-word status, indexed with the wave so a wave start loads only the queued rows.
    """

    __tablename__ = "rollout_devices"
    __table_args__ = (Index("ix_rollout_devices_wave_status", "rollout_id", "wave", "status"),)

    rollout_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(32))
    wave: Mapped[int | None] = mapped_column(Integer, nullable=True)
    hardware_class: Mapped[str] = mapped_column(String(128))
    from_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    unplaceable: Mapped[str | None] = mapped_column(Text, nullable=True)
    assigned_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    reverted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    failed_stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)
