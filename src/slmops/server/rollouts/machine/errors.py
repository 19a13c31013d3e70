"""Domain errors of the rollout machine (exit code 2: the operator asked for something wrong)."""

from __future__ import annotations

from collections.abc import Iterable

from slmops.core.errors import UserInputError


class InvalidTransition(UserInputError):
    """An operator command that the rollout's current state does not allow.

    The state is left untouched when this is raised, so the caller can report it and carry on.
    """

    def __init__(
        self,
        command: str,
        status: str,
        *,
        rollout_id: str,
        allowed: Iterable[str] = (),
        why: str | None = None,
    ) -> None:
        self.command = command
        self.status = status
        allowed_list = sorted(allowed)
        message = f"cannot {command} a rollout that is {status}"
        if why:
            message = f"{message}: {why}"
        hint = (
            f"'{command}' is allowed only when the rollout is {' or '.join(allowed_list)}"
            if allowed_list
            else None
        )
        super().__init__(message, where=f"rollout {rollout_id}", hint=hint)


class NeedDevices(Exception):
    """The step needs a set of device records the caller did not load (``RolloutState.loaded``).

    A store that keeps device records outside the state (one row per device) loads only the
    records an event names; the few steps that act on many devices at once (filling a wave
    needs every queued device, a rollback every moved one) raise this before changing anything,
    and the caller loads ``kind`` ("queued" or "moved") and steps again.
    """

    def __init__(self, kind: str) -> None:
        super().__init__(f"the step needs every {kind} device record")
        self.kind = kind
