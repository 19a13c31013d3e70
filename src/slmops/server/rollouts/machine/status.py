"""The rollout's lifecycle states and the strict model base every rollout record shares.

``RolloutModel`` refuses NaN and infinity on top of ``StrictModel``'s unknown-key check: JSON has
no spelling for them (pydantic writes ``null``), so allowing them would break the exact JSON round
trip that lets a restarted server resume a rollout where it stopped.
"""

from __future__ import annotations

from enum import StrEnum

from slmops.core.config import StrictModel


class RolloutModel(StrictModel):
    """Base of every rollout model: extra keys refused, only finite floats."""

    model_config = StrictModel.model_config | {"allow_inf_nan": False}


class RolloutStatus(StrEnum):
    """Where the rollout as a whole is; see the package docstring for the diagram."""

    CREATED = "created"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"
    ABORTED = "aborted"

    @property
    def is_terminal(self) -> bool:
        """Terminal states absorb: no event moves a rollout out of them or assigns a device."""
        return self in _TERMINAL


_TERMINAL = frozenset({RolloutStatus.SUCCEEDED, RolloutStatus.ROLLED_BACK, RolloutStatus.ABORTED})
