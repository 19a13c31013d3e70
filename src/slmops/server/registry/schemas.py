"""The model catalog API's response and request bodies (``model_routes.py`` holds the handlers).

A model is a repository with its versions (tags on bundle indexes) and channels; a version's
full description is ``catalog.VersionPublic`` (built without HTTP, desired state uses it too).
The OCI API under /v2 (``routes.py``) speaks the distribution spec's own JSON and has none.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from slmops.core.config import StrictModel


class VersionRef(StrictModel):
    tag: str
    digest: str
    updated_at: datetime


class ModelPublic(StrictModel):
    name: str
    versions: list[VersionRef]
    channels: dict[str, str] = Field(description="channel -> version")


class ModelList(StrictModel):
    data: list[ModelPublic]


class ChannelSet(StrictModel):
    version: str = Field(min_length=1, max_length=128)


class ChannelPublic(StrictModel):
    name: str
    channel: str
    version: str
    digest: str
    updated_at: datetime
