"""The blueprints API's response bodies (``routes.py`` holds the handlers).

The request body is the Blueprint document itself (``document.py``); what comes back is the
stored row with the document as applied, and for a PUT whether it changed anything and which
rollout it started. An asynchronous apply (202) answers before settling: the caller watches
``settled_generation`` reach ``generation`` on GET.
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
    settled_generation: int = Field(
        description="the last generation whose rollout was created and devices settled; "
        "equal to generation once an apply has taken effect"
    )
    settling: bool = Field(
        description="an apply is being settled (its rollout created, its devices re-governed)"
    )
    settled_rollout: str | None = Field(
        description="the rollout the settled generation created (None: it needed none)"
    )
    settle_error: str | None = Field(
        description="why the last settle failed (None: it did not); retried by the server"
    )
    created_at: datetime
    updated_at: datetime
    document: dict[str, Any] = Field(description="the Blueprint as applied")


class ApplyResult(BlueprintPublic):
    changed: bool
    devices: int | None = Field(
        description="devices this blueprint governs now (None: answered before settling)"
    )
    rollout: str | None = Field(None, description="the rollout this apply created, if any")


class BlueprintList(StrictModel):
    data: list[BlueprintPublic]
