"""The ``blueprints`` table: one row per applied Blueprint, keyed by ``metadata.name``.

Only the spec is stored (the name is the key, apiVersion and kind are constant), as JSON so
the document round-trips exactly; ``generation`` counts the applies that changed it, so an
operator can tell which revision a device's desired state came from. ``stable_version`` is the
version the blueprint's devices run outside a rollout: it moves only when a rollout succeeds
(``server/rollouts/service.py``), so a rolled-back or aborted version never reaches new devices.
``stable_adapters`` is the same for the blueprint's adapter assignments (as stored by
``document.adapter_release``; null: no release has succeeded yet, so none).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from slmops.server.db.base import Base, Tz, utcnow


class BlueprintRow(Base):
    __tablename__ = "blueprints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63), unique=True, index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    stable_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stable_adapters: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
