"""The ``blueprints`` table: one row per applied Blueprint, keyed by ``metadata.name``.

Only the spec is stored (the name is the key, apiVersion and kind are constant), as JSON so
the document round-trips exactly; ``generation`` counts the applies that changed it, so an
operator can tell which revision a device's desired state came from. ``stable_version`` is the
version the blueprint's devices run outside a rollout: it moves only when a rollout succeeds
(``server/rollouts/service.py``), so a rolled-back or aborted version never reaches new devices.
``stable_adapters`` is the same for the blueprint's adapter assignments (as stored by
``document.adapter_release``; null: no release has succeeded yet, so none).

``settled_generation`` is the last generation whose rollout was created and whose devices were
settled, ``settled_rollout`` the rollout it created; ``settling_until`` / ``settling_by`` are the
settle lease and its holder's token, ``settle_error`` / ``settle_failed_at`` why and when the
last settle failed, and ``applied_by`` who stored the current generation (``settling.py``: an
apply may be settled after its request answered, by whichever process holds the lease).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from slmops.server.db.base import Base, Tz, utcnow


def _settled_as_stored(context: Any) -> int:
    """A row inserted without saying (a script, a test, an import) counts as settled: only an
    apply (which sets 0) leaves settling to a lease holder."""
    return int(context.get_current_parameters().get("generation") or 1)


class BlueprintRow(Base):
    __tablename__ = "blueprints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63), unique=True, index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    stable_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stable_adapters: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    settled_generation: Mapped[int] = mapped_column(
        Integer, default=_settled_as_stored, server_default="0"
    )
    settled_rollout: Mapped[str | None] = mapped_column(String(64), nullable=True)
    settling_until: Mapped[datetime | None] = mapped_column(Tz, nullable=True)
    settling_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    settle_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    settle_failed_at: Mapped[datetime | None] = mapped_column(Tz, nullable=True)
    applied_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
