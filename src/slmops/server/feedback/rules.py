"""Feedback rules: which alert triggers which actions, declared like a blueprint.

    apiVersion: slmops/v1
    kind: FeedbackRules
    metadata: {name: default}
    spec:
      rules:
        - name: quality-drift
          match: {kind: drift, statistic: psi:logprob}     # any alert field; omitted = any
          actions:
            - pause: {}                                     # pause the version's active rollouts
            - notify: {url: "http://127.0.0.1:9000/hooks/slmops"}
            - improve: {direction: higher-precision, start: manual}

``improve`` opens an improvement job for the alert's version and profile; when its gate passes,
the blueprint is moved to the new version and the rollout it creates waits for an operator's
``start`` (``start: manual``, the default) or starts at once (``start: auto``). Rules are matched
in order and every matching rule acts; each action runs at most once per alert.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from slmops.core.config import StrictModel
from slmops.protocol.document import Direction, Document


class Match(StrictModel):
    """Alert fields to match exactly; a field left out matches anything."""

    kind: str | None = None
    statistic: str | None = None
    model: str | None = None
    version: str | None = None
    profile: str | None = None
    min_value: float | None = Field(None, description="only alerts whose value is at least this")


class Pause(StrictModel):
    reason: str | None = None


class Notify(StrictModel):
    url: str = Field(pattern=r"^https?://", max_length=2000)
    timeout_seconds: float = Field(5.0, gt=0, le=60, strict=True)


class Improve(StrictModel):
    direction: Direction
    start: Literal["manual", "auto"] = "manual"


class Action(StrictModel):
    """Exactly one of the keys."""

    pause: Pause | None = None
    notify: Notify | None = None
    improve: Improve | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        given = [k for k in ("pause", "notify", "improve") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"an action has exactly one of pause, notify, improve (got {given})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("pause", "notify", "improve") if getattr(self, k) is not None)


class Rule(StrictModel):
    name: str = Field(min_length=1, max_length=63)
    match: Match = Field(default_factory=Match)
    actions: list[Action] = Field(min_length=1, max_length=10)


class RulesSpec(StrictModel):
    rules: list[Rule] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(dup)}")
        return self


class FeedbackRules(Document):
    kind: Literal["FeedbackRules"]
    spec: RulesSpec


def matches(match: Match, alert: dict[str, object]) -> bool:
    for key in ("kind", "statistic", "model", "version", "profile"):
        want = getattr(match, key)
        if want is not None and alert.get(key) != want:
            return False
    if match.min_value is not None:
        value = alert.get("value")
        if not isinstance(value, int | float) or value < match.min_value:
            return False
    return True
