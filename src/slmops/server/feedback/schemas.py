"""The feedback API's request and response bodies (``routes.py`` holds the handlers).

Rule sets come back with their document as applied; improvement jobs and alert actions are
listed as stored; ``ClaimBody`` and ``ResultBody`` are what an improvement worker posts when it
takes a job and when it is done with it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from slmops.core.config import StrictModel


class RulesPublic(StrictModel):
    name: str
    generation: int
    updated_at: datetime
    document: dict[str, Any]
    changed: bool | None = None


class JobPublic(StrictModel):
    id: int
    alert_id: int
    rule: str
    blueprint: str
    model: str
    version: str
    variant: str
    profile: str
    direction: str
    start: str
    status: str
    worker: str
    new_version: str
    rollout_id: str
    result: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class JobList(StrictModel):
    data: list[JobPublic]


class ActionPublic(StrictModel):
    alert_id: int
    rule: str
    action: str
    ok: bool
    detail: str
    job_id: int | None
    created_at: datetime


class ActionList(StrictModel):
    data: list[ActionPublic]


class ClaimBody(StrictModel):
    worker: str = Field(min_length=1, max_length=128)


class ResultBody(StrictModel):
    ok: bool = Field(description="the candidate passed its gate and was pushed as new_version")
    new_version: str | None = None
    detail: str = Field("", max_length=4000)
    candidate: dict[str, Any] = Field(default_factory=dict)
