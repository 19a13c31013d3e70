"""Group work on one key from many request threads into one transaction (flat combining).

Every device report steps its rollout under the rollout row's lock (``rollouts/service.py``:
``run_event``), so reports of one rollout run one at a time however many threads serve them:
measured with 10,000 simulated devices on two API processes, a wave's reports queued on that
lock at under a hundred a second, which alone would take a 100,000-device rollout hours. Here
the first thread to arrive for a key becomes its leader and runs everything queued for that key
as one group (one lock, one read, one write, one commit); the others wait for their group's
outcome. When the leader's group is done and more is queued, it hands the lead to the thread
of the first item queued (so no request waits on other requests' groups for more than one turn)
and answers its own. Under no load a group is one item and costs what it did; under load groups
grow by themselves, so the lock is taken once per group.

When a group fails, every item in it is run again on its own by the thread that submitted it
(``Outcome.ALONE``), so one bad item fails only its own request.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_GROUP = 500  # items per group: bounds one transaction's size and a leader's turn


class Outcome(enum.Enum):
    DONE = "done"
    ALONE = "alone"  # the group failed: run this item on its own
    LEAD = "lead"  # still queued: this item's thread runs the next group


@dataclass
class _Item(Generic[T]):
    value: T
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome = Outcome.DONE


class Combiner(Generic[T]):
    """One per app (``Services``); ``submit`` from any thread."""

    def __init__(self, max_group: int = MAX_GROUP) -> None:
        self.max_group = max_group
        self._lock = threading.Lock()
        self._queued: dict[str, list[_Item[T]]] = {}
        self._leading: set[str] = set()
        self.groups = self.items = self.failed_groups = 0

    def submit(
        self,
        key: str,
        value: T,
        run_group: Callable[[Sequence[T]], None],
        run_alone: Callable[[T], None],
    ) -> None:
        """Run ``value`` with whatever else is queued for ``key`` (``run_group``); if that
        group fails, ``run_alone(value)`` here, raising what it raises."""
        item = _Item(value)
        with self._lock:
            self._queued.setdefault(key, []).append(item)
            lead = key not in self._leading
            if lead:
                self._leading.add(key)
        while True:
            if lead:
                self._lead(key, run_group)
            item.done.wait()
            if item.outcome is not Outcome.LEAD:
                break
            item.outcome, lead = Outcome.DONE, True  # handed the lead: our item is queued first
            item.done.clear()
        if item.outcome is Outcome.ALONE:
            run_alone(value)

    def _lead(self, key: str, run_group: Callable[[Sequence[T]], None]) -> None:
        """Run one group (it holds the leader's own item), then hand the lead on or end it."""
        with self._lock:
            queued = self._queued.pop(key, [])
            group, rest = queued[: self.max_group], queued[self.max_group :]
            if rest:
                self._queued[key] = rest
        try:
            run_group([i.value for i in group])
        except Exception:
            self.failed_groups += 1
            for i in group:
                i.outcome = Outcome.ALONE
        handoff = None
        with self._lock:
            self.groups += 1
            self.items += len(group)
            waiting = self._queued.get(key)
            if waiting:
                handoff = waiting[0]
                handoff.outcome = Outcome.LEAD
            else:
                self._leading.discard(key)
        for i in group:
            i.done.set()
        if handoff is not None:
            handoff.done.set()
