"""Telemetry tables (created by migration 0005; the ``adapter`` dimension by 0009).

- ``telemetry_batches``: one row per delivered batch; ``UNIQUE(device_id, batch_id)`` makes a
  retried batch a no-op even when two deliveries race (the loser's insert fails).
- ``telemetry_windows``: one row per window, with its dimensions as columns (empty string for
  "none", so they can take part in unique keys) and the window as received in ``aggregate``.
- ``telemetry_hourly``: the roll-up, one row per (hour of the window's start, device, model,
  version, variant, rollout, adapter) holding a merged aggregate (``aggregate.Acc`` form).
  Queries read whole hours from here and only the partial hours at the edges of a range from the
  windows, so a query over months reads one row per device-hour. ``revision`` makes merges
  optimistic.
- ``telemetry_counters``: ingestion counters for /metrics, incremented in SQL.
- ``alerts``: drift and regression alerts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from slmops.server.db.base import Base, Tz, utcnow


class TelemetryBatchRow(Base):
    __tablename__ = "telemetry_batches"
    __table_args__ = (UniqueConstraint("device_id", "batch_id", name="uq_telemetry_batches_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("devices.device_id", ondelete="CASCADE")
    )
    batch_id: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
    windows: Mapped[int] = mapped_column(Integer, default=0)
    dropped_windows: Mapped[int] = mapped_column(Integer, default=0)
    # none_as_null: no samples is SQL NULL on every path (the ORM's, SQLAlchemy's multi-row
    # INSERT and PostgreSQL's recordset INSERT, where a JSON null arrives as SQL NULL)
    samples: Mapped[list[dict[str, Any]] | None] = mapped_column(
        JSON(none_as_null=True), nullable=True
    )


class _Dims:
    model: Mapped[str] = mapped_column(String(128), default="")
    version: Mapped[str] = mapped_column(String(64), default="")
    variant: Mapped[str] = mapped_column(String(128), default="")
    profile: Mapped[str] = mapped_column(String(128), default="")
    rollout_id: Mapped[str] = mapped_column(String(64), default="")
    adapter: Mapped[str] = mapped_column(String(200), default="")  # "name:version" (migration 0009)


class TelemetryWindowRow(_Dims, Base):
    __tablename__ = "telemetry_windows"
    __table_args__ = (
        Index("ix_telemetry_windows_start", "start_ts"),
        Index("ix_telemetry_windows_batch", "batch_pk"),
        Index("ix_telemetry_windows_version", "version", "profile", "start_ts"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_pk: Mapped[int] = mapped_column(
        Integer, ForeignKey("telemetry_batches.id", ondelete="CASCADE")
    )
    device_id: Mapped[str] = mapped_column(String(128))
    start_ts: Mapped[float] = mapped_column(Float)
    end_ts: Mapped[float] = mapped_column(Float)
    aggregate: Mapped[dict[str, Any]] = mapped_column(JSON)


class TelemetryHourlyRow(_Dims, Base):
    __tablename__ = "telemetry_hourly"
    __table_args__ = (
        UniqueConstraint(
            "hour",
            "device_id",
            "model",
            "version",
            "variant",
            "rollout_id",
            "adapter",
            name="uq_telemetry_hourly_key",
        ),
        Index("ix_telemetry_hourly_hour", "hour"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hour: Mapped[float] = mapped_column(Float)
    device_id: Mapped[str] = mapped_column(String(128))
    aggregate: Mapped[dict[str, Any]] = mapped_column(JSON)
    revision: Mapped[int] = mapped_column(Integer, default=0)


class TelemetryCounter(Base):
    __tablename__ = "telemetry_counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class AlertRow(Base):
    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_created", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # drift | regression
    model: Mapped[str] = mapped_column(String(128), default="")
    version: Mapped[str] = mapped_column(String(64), default="")
    profile: Mapped[str] = mapped_column(String(128), default="")
    statistic: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
    acknowledged: Mapped[bool] = mapped_column(Boolean, default=False)
