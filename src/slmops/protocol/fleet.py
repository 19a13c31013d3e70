"""States the edge agent reports for its part in a rollout (one action per device and rollout).

The agent moves through them in order: it learns its new target (``scheduled``), fetches the
bundle (``downloading``), checks digests and signature (``verifying``), writes the idle slot
(``installing``), probes the new model before switching (``health-checking``) and ends in one of
three final states: ``active`` (the new model serves), ``failed`` (it stopped at some stage and
still serves what it served before) or ``rolled-back`` (it is back on its previous model, either
because the control plane told it to revert or because its own post-switch health check failed
and it swapped back to the kept slot).

Only these eight values travel on the wire. Rollout-side notions such as "queued for a later
wave" or "skipped, already on the target version" are the control plane's own bookkeeping and
never reported by a device, so they are not members here (an agent cannot claim them).
"""

from __future__ import annotations

from enum import StrEnum


class DeviceActionState(StrEnum):
    """Where one device is in applying the target (or the revert) that a rollout gave it."""

    SCHEDULED = "scheduled"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECKING = "health-checking"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"

    @property
    def is_final(self) -> bool:
        """True for the states that end the device's action: active, failed, rolled-back."""
        return self in _FINAL


_FINAL = frozenset(
    {DeviceActionState.ACTIVE, DeviceActionState.FAILED, DeviceActionState.ROLLED_BACK}
)
