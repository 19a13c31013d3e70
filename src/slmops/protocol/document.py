"""What every operator document (Blueprint, FeedbackRules) shares: the Kubernetes-style envelope.

``apiVersion: slmops/v1``, a ``kind``, ``metadata.name`` (a DNS-label-like name: it becomes part
of rollout ids and URLs) and a ``spec``. The name rule lived twice, copied; one definition keeps
the CLI's local check and the server's check the same.
"""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import model_validator

from slmops.core.config import StrictModel

NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?\Z")
API_VERSION = "slmops/v1"

# What an improvement job changes in the recipe of the variant a fleet runs (feedback rules
# name it; optimize/adjust.py carries it out).
Direction = Literal["higher-precision", "smaller"]


class Metadata(StrictModel):
    name: str

    @model_validator(mode="after")
    def _name(self) -> Self:
        if not NAME.match(self.name):
            raise ValueError("metadata.name must be lowercase letters, digits, '.' or '-'")
        return self


class Document(StrictModel):
    """The envelope; subclasses narrow ``kind`` to a Literal and add a typed ``spec``."""

    apiVersion: Literal["slmops/v1"]  # the YAML key, as in Kubernetes
    metadata: Metadata
