"""The rollouts API's request and response bodies (``routes.py`` holds the handlers).

Views of a rollout: ``RolloutSummary`` (counts from the tally), ``RolloutDetail`` (waves with
their gate results, one page of devices, history); ``ActionBody`` is what a start, pause, ...
command may carry. Kept apart so the handlers read as what they do, and so the OpenAPI names
(``RolloutDetail``, ...) have one home.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from slmops.core.config import StrictModel
from slmops.server.rollouts.machine import StateChanged
from slmops.server.rollouts.machine.gates import GateEvaluation


class RolloutSummary(StrictModel):
    id: str
    blueprint: str
    model: str
    target_version: str
    adapters: list[dict[str, Any]] | None = Field(
        None,
        description="the release's adapter assignments (selector, adapter, version); null: a "
        "rollout of the version alone",
    )
    status: str
    wave: int | None = Field(description="current wave index; null before the start")
    waves: int = Field(description="waves in the policy")
    devices: int = Field(description="devices the rollout moves (matched, not already there)")
    matched: int = Field(0, description="devices matched: moved, queued, skipped or unplaceable")
    by_status: dict[str, int] = Field(description="devices per action state (queued, active, ..)")
    unplaceable: dict[str, int] = Field(
        default_factory=dict, description="unplaceable devices per reason (numbers folded to N)"
    )
    created_at: datetime
    updated_at: datetime


class WavePublic(StrictModel):
    index: int
    target: int = Field(description="cumulative devices moved by the end of this wave")
    size: str = Field(description="the policy's wave step, e.g. 1% or 5 devices")
    started_at: float | None
    ended_at: float | None
    outcome: str | None
    ended_by: str | None
    devices: int = Field(0, description="devices this wave assigned (from the tally)")
    reported: int = Field(0, description="of those, devices with a final report")
    succeeded: int = Field(0, description="of those, devices that report active")
    health_failures: int = 0
    evaluation: GateEvaluation | None
    decision: GateEvaluation | None


class DevicePage(StrictModel):
    """Which page of devices ``device_list`` holds, and how to ask for the next."""

    limit: int
    after: str | None = Field(description="the cursor this page starts after (a device id)")
    wave: int | None = Field(description="only devices this wave assigned")
    status: str | None = Field(description="only devices with this status")
    returned: int
    next: str | None = Field(
        description="pass as `after` (with the same filters) for the next page; null: last page"
    )


class DeviceInRollout(StrictModel):
    device_id: str
    hardware_class: str
    from_version: str | None
    wave: int | None
    status: str
    failed_stage: str | None
    detail: str | None
    reported_at: float | None


class RolloutDetail(RolloutSummary):
    policy: dict[str, Any]
    wave_list: list[WavePublic]
    device_list: list[DeviceInRollout] = Field(description="one page of devices: see device_page")
    device_page: DevicePage
    history: list[StateChanged]


class RolloutList(StrictModel):
    data: list[RolloutSummary]


class ActionBody(StrictModel):
    reason: str | None = Field(None, max_length=500)
    wave: int | None = Field(
        None,
        ge=0,
        le=1 << 20,
        strict=True,
        description="the wave you saw; refused if the rollout has moved on",
    )
