"""Rows of the feedback loop: applied rule sets, actions taken per alert, improvement jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from slmops.server.db.base import Base, Tz, utcnow


class FeedbackRulesRow(Base):
    __tablename__ = "feedback_rules"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)


class AlertAction(Base):
    """One action one rule took for one alert; the unique key makes it happen at most once."""

    __tablename__ = "alert_actions"
    __table_args__ = (
        UniqueConstraint("alert_id", "rule", "action_index", name="uq_alert_actions_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(Integer, index=True)
    rule: Mapped[str] = mapped_column(String(128))  # "<rules name>/<rule name>", or "" = none
    action_index: Mapped[int] = mapped_column(Integer, default=0)
    action: Mapped[str] = mapped_column(String(16))  # pause | notify | improve | none
    ok: Mapped[bool] = mapped_column(Boolean, default=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)


class ImprovementJob(Base):
    """queued -> running (claimed by a worker) -> proposed | rejected | failed."""

    __tablename__ = "improvement_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(Integer, index=True)
    rule: Mapped[str] = mapped_column(String(128))
    blueprint: Mapped[str] = mapped_column(String(63), default="")
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(128), default="")
    profile: Mapped[str] = mapped_column(String(128), default="")
    direction: Mapped[str] = mapped_column(String(32))
    start: Mapped[str] = mapped_column(String(16), default="manual")
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    worker: Mapped[str] = mapped_column(String(128), default="")
    new_version: Mapped[str] = mapped_column(String(64), default="")
    rollout_id: Mapped[str] = mapped_column(String(64), default="")
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
