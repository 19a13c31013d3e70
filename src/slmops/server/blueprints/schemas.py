"""The blueprints API's response bodies (``routes.py`` holds the handlers).

The request body is the Blueprint document itself (``document.py``); what comes back is the
stored row with the document as applied, and for a PUT whether it changed anything and which
rollout it started.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from slmops.core.config import StrictModel


class BlueprintPublic(StrictModel):
    name: str
    generation: int = Field(description="incremented by every apply that changed the spec")
    stable_version: str | None = Field(
        description="what devices outside a rollout run: the last version a rollout completed"
    )
    created_at: datetime
    updated_at: datetime
    document: dict[str, Any] = Field(description="the Blueprint as applied")


class ApplyResult(BlueprintPublic):
    changed: bool
    devices: int = Field(description="devices this blueprint governs now")
    rollout: str | None = Field(None, description="the rollout this apply created, if any")


class BlueprintList(StrictModel):
    data: list[BlueprintPublic]
