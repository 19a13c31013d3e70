"""The rollout tables: ``rollouts`` (one summary row per rollout) and ``rollout_devices``.

They live with the rollout domain, like ``blueprints/tables.py`` and ``registry/tables.py``,
so a newcomer finds a rollout's rows next to the code that reads and writes them
(``store.py``). ``db/metadata.py`` imports this module so Alembic and the schema tests see both
tables. ``device_actions`` is not here: it is the device's last reported action (written at
check-in and with telemetry, read by the device views) and stays in ``db/models.py``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from slmops.server.db.base import Base, Tz, utcnow


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
