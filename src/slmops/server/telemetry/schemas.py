"""The telemetry API's response bodies (``routes.py`` holds the handlers).

``TelemetrySummary`` carries the dicts ``query.summarize`` documents; alerts are the drift and
regression alerts as stored, with whether an operator acknowledged them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class TelemetrySummary(BaseModel):
    data: list[dict[str, Any]]
    count: int


class AlertPublic(BaseModel):
    id: int
    kind: str
    model: str
    version: str
    profile: str
    statistic: str
    value: float
    threshold: float
    details: dict[str, Any]
    created_at: datetime
    acknowledged: bool


class AlertList(BaseModel):
    data: list[AlertPublic]
    count: int
