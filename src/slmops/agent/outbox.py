"""The telemetry outbox: closed windows and samples kept on disk until the server acknowledges.

Edge links are flaky and devices get power-cycled, so nothing is kept only in memory: each
window and sample is its own file, written atomically (temp, fsync, rename), and a single
``state.json`` (also atomic) is the commit point for everything else: the batch in flight, the
drop counters, the bytes sent today, and the files an acknowledgement or a drop has condemned
(deleted after the commit, and again at start-up if a kill came in between). A file that does
not parse (disk corruption, a hand edit) is deleted and counted, never fatal.

A batch, once built, is frozen: ``next_batch`` returns the same ``batch_id`` and the same gzip
bytes on every retry until ``ack``, also across restarts, so the server can deduplicate by id.
Gzip is written with ``mtime=0`` so the same content gives the same bytes.

Bounds, each counted so nothing is lost silently (a batch carries ``dropped_windows`` and a
``dropped_reason`` until it is acknowledged): at most ``policy.buffer_max_windows`` windows
are kept (the oldest are dropped first, those in the batch in flight excepted); at most
``policy.daily_byte_budget`` compressed bytes are *delivered* (acknowledged) per UTC day: a batch
that does not fit in what is left of today's budget waits for the next day (it is built
smaller first, down to a single window); an item that could not fit even in a whole day's
budget is dropped. Disabling telemetry deletes the buffer; revoking the samples opt-in deletes
the buffered samples (and rebuilds the batch in flight if it held any).
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.agent.telemetry import utc_day
from slmops.core.atomic import clean_stale_temps, write_bytes_atomic, write_json_atomic
from slmops.protocol.telemetry import Sample, TelemetryBatch, TelemetryPolicy, WindowAggregate

STATE = "state.json"
WINDOW = "w-"
SAMPLE = "s-"
BATCH = "batch-"

BUFFER_FULL = "buffer_full"
CORRUPT = "corrupt"
TOO_LARGE = "too_large"
MAX_BUFFERED_SAMPLES = 1000


@dataclass(frozen=True)
class OutboxStats:
    buffered_windows: int
    buffered_samples: int
    dropped_windows: int  # not yet reported in an acknowledged batch
    dropped: dict[str, int]  # windows by reason
    dropped_samples: dict[str, int]  # samples by reason
    corrupt_files: int  # total files skipped since the outbox was created
    bytes_sent_today: int
    day: str
    pending_batch: str | None


@dataclass
class _State:
    day: str = ""
    sent: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_samples: dict[str, int] = field(default_factory=dict)
    corrupt_files: int = 0
    pending: dict[str, Any] | None = None  # id, windows, samples, dropped, dropped_samples
    delete: list[str] = field(default_factory=list)  # condemned files, unlinked after commit
    seq: int = 1  # the next file number (at least)


def _subtract(counts: dict[str, int], reported: dict[str, int]) -> dict[str, int]:
    left = {k: v - reported.get(k, 0) for k, v in counts.items()}
    return {k: v for k, v in left.items() if v > 0}


def _reason(dropped: dict[str, int], samples: dict[str, int]) -> str | None:
    parts = [f"{k}={v}" for k, v in sorted(dropped.items())]
    parts += [f"samples {k}={v}" for k, v in sorted(samples.items())]
    return "; ".join(parts)[:200] or None


class Outbox:
    """Durable, bounded telemetry buffer with frozen, idempotent batches (see module docstring).

    Thread-safe; one process per directory.
    """

    def __init__(
        self,
        directory: Path,
        policy: TelemetryPolicy,
        *,
        clock: Callable[[], float] = time.time,
        max_windows_per_batch: int = 96,
        max_samples_per_batch: int = 20,
    ) -> None:
        if max_windows_per_batch < 1 or not 0 <= max_samples_per_batch <= 50:
            raise ValueError(
                f"max_windows_per_batch must be >= 1 (got {max_windows_per_batch}) and "
                f"max_samples_per_batch in 0..50 (got {max_samples_per_batch})"
            )
        self.directory = directory
        self._policy = policy
        self._clock = clock
        self._max_windows = min(max_windows_per_batch, 500)  # TelemetryBatch.windows max_length
        self._max_samples = max_samples_per_batch
        self._lock = threading.Lock()
        self._held_day = ""  # the UTC day on which the next batch was found not to fit
        directory.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(directory)
        self._state = self._load_state()
        names = [p.name for p in directory.glob("[ws]-*.json")]  # condemned ones too
        last = max((int(n[2:-5]) for n in names if n[2:-5].isdigit()), default=0)
        self._seq = max(last + 1, self._state.seq)  # file names are never reused
        self._commit()  # carries out deletions a kill interrupted
        pending_id = (self._state.pending or {}).get("id")
        for p in directory.glob(BATCH + "*"):
            if p.name != f"{BATCH}{pending_id}.gz":
                p.unlink(missing_ok=True)  # a batch built but never committed

    # -- state --------------------------------------------------------------------------------

    def _load_state(self) -> _State:
        path = self.directory / STATE
        if not path.exists():
            return _State()
        try:
            raw = json.loads(path.read_text())
            return _State(**raw)
        except (ValueError, TypeError, OSError):
            return _State(corrupt_files=1)  # the batch in flight is rebuilt under a new id

    def _commit(self) -> None:
        """Persist the state, then delete the files it condemned (idempotent after a kill)."""
        self._state.seq = max(self._state.seq, self._seq)
        write_json_atomic(self.directory / STATE, self._state.__dict__)
        for name in self._state.delete:
            (self.directory / name).unlink(missing_ok=True)
        # forgotten in memory only: the persisted list is harmless (names are never reused,
        # see seq) and is replaced at the next commit, which saves an fsync per commit
        self._state.delete = []

    def _commit_if_condemned(self) -> None:
        """Persist only if corrupt files were found: an idle poll must not cost an fsync."""
        if self._state.delete:
            self._commit()

    def _roll_day(self) -> None:
        day = utc_day(self._clock())
        if day != self._state.day:
            self._state.day, self._state.sent = day, 0

    def _names(self, prefix: str) -> list[str]:
        return sorted(
            p.name
            for p in self.directory.glob(prefix + "*.json")
            if p.name not in self._state.delete
        )

    def _pending_members(self) -> set[str]:
        pending = self._state.pending
        return set(pending["windows"]) | set(pending["samples"]) if pending else set()

    # -- input --------------------------------------------------------------------------------

    def put(self, windows: Iterable[WindowAggregate] = (), samples: Iterable[Sample] = ()) -> None:
        """Store closed windows and samples durably, then enforce the buffer caps."""
        with self._lock:
            windows, samples = list(windows), list(samples)
            if not self._policy.enabled or not (windows or samples):
                return
            for w in windows:
                self._write(WINDOW, w.model_dump_json().encode())
            if self._policy.samples:
                for s in samples:
                    self._write(SAMPLE, s.model_dump_json().encode())
            self._enforce_caps()

    def _write(self, prefix: str, data: bytes) -> None:
        write_bytes_atomic(self.directory / f"{prefix}{self._seq:012d}.json", data)
        self._seq += 1

    def _enforce_caps(self) -> None:
        pending = self._pending_members()
        changed = False
        for prefix, cap, counts in (
            (WINDOW, self._policy.buffer_max_windows, self._state.dropped),
            (SAMPLE, MAX_BUFFERED_SAMPLES, self._state.dropped_samples),
        ):
            names = self._names(prefix)
            droppable = [n for n in names if n not in pending]
            excess = min(len(names) - cap, len(droppable))
            if excess > 0:
                self._state.delete += droppable[:excess]
                counts[BUFFER_FULL] = counts.get(BUFFER_FULL, 0) + excess
                changed = True
        if changed:
            self._commit()

    def set_policy(self, policy: TelemetryPolicy) -> None:
        with self._lock:
            self._policy = policy
            self._held_day = ""  # a larger budget may let the held batch go today
            if not policy.enabled:
                names = self._names(WINDOW) + self._names(SAMPLE)
                self._state.delete += names
                self._drop_pending()
                self._state.dropped, self._state.dropped_samples = {}, {}
            elif not policy.samples:
                if self._state.pending and self._state.pending["samples"]:
                    self._drop_pending()
                self._state.delete += self._names(SAMPLE)
            self._commit()
            self._enforce_caps()

    def _drop_pending(self) -> None:
        if self._state.pending:
            self._state.delete.append(f"{BATCH}{self._state.pending['id']}.gz")
            self._state.pending = None

    # -- output -------------------------------------------------------------------------------

    def _load(self, names: list[str], cls: type[Any], counts: dict[str, int]) -> list[Any]:
        """Parse buffered files; a file that does not parse is condemned and counted."""
        items = []
        for name in names:
            try:
                items.append((name, cls.model_validate_json((self.directory / name).read_bytes())))
            except (ValueError, OSError):
                self._state.delete.append(name)
                counts[CORRUPT] = counts.get(CORRUPT, 0) + 1
                self._state.corrupt_files += 1
        return items

    def _encode(self, batch_id: str, windows: list[Any], samples: list[Any]) -> bytes:
        batch = TelemetryBatch(
            batch_id=batch_id,
            windows=[w for _, w in windows],
            samples=[s for _, s in samples],
            dropped_windows=sum(self._state.dropped.values()),
            dropped_reason=_reason(self._state.dropped, self._state.dropped_samples),
        )
        text = batch.model_dump_json(by_alias=True, exclude_none=True)
        return gzip.compress(text.encode(), compresslevel=9, mtime=0)

    def next_batch(self) -> tuple[str, bytes] | None:
        """The batch to send now as (batch_id, gzip bytes), or None: nothing to send, telemetry
        disabled, or today's byte budget cannot take it (then wait for the next UTC day)."""
        with self._lock:
            if not self._policy.enabled:
                return None
            self._roll_day()
            if self._state.pending is not None:
                path = self.directory / f"{BATCH}{self._state.pending['id']}.gz"
                try:
                    return self._state.pending["id"], path.read_bytes()
                except OSError:
                    self._drop_pending()  # its bytes are gone: rebuild under a new id
                    self._state.corrupt_files += 1
            if self._held_day == self._state.day:
                return None  # already found that the next batch does not fit today
            return self._build(self._policy.daily_byte_budget - self._state.sent)

    def _build(self, remaining: int) -> tuple[str, bytes] | None:
        """Freeze the next batch that fits in ``remaining`` bytes, or None to wait for the next
        day; an item too large for even a whole day's budget is dropped (counted)."""
        while True:
            windows = self._load(
                self._names(WINDOW)[: self._max_windows], WindowAggregate, self._state.dropped
            )
            samples: list[Any] = []
            if self._policy.samples:
                samples = self._load(
                    self._names(SAMPLE)[: self._max_samples], Sample, self._state.dropped_samples
                )
            if not (windows or samples or self._state.dropped or self._state.dropped_samples):
                self._commit_if_condemned()
                return None
            batch_id = uuid.uuid4().hex
            data = self._encode(batch_id, windows, samples)
            while len(data) > remaining and len(windows) + len(samples) > 1:
                if samples:  # windows first: they feed the rollout gates
                    samples = samples[: len(samples) // 2]
                else:
                    windows = windows[: len(windows) // 2]
                data = self._encode(batch_id, windows, samples)
            if len(data) <= remaining:
                break
            if len(data) <= self._policy.daily_byte_budget or not (windows or samples):
                self._commit_if_condemned()
                self._held_day = self._state.day
                return None  # fits a fresh day: hold it until tomorrow
            name = (windows or samples)[0][0]
            counts = self._state.dropped if windows else self._state.dropped_samples
            counts[TOO_LARGE] = counts.get(TOO_LARGE, 0) + 1
            self._state.delete.append(name)
            self._commit()
        write_bytes_atomic(self.directory / f"{BATCH}{batch_id}.gz", data)
        self._state.pending = {
            "id": batch_id,
            "windows": [n for n, _ in windows],
            "samples": [n for n, _ in samples],
            "dropped": dict(self._state.dropped),
            "dropped_samples": dict(self._state.dropped_samples),
            "size": len(data),
        }
        self._commit()
        return batch_id, data

    def ack(self, batch_id: str) -> bool:
        """The server has the batch: forget what it delivered and the drops it reported.
        Returns False (and changes nothing) for an unknown or already acknowledged id."""
        with self._lock:
            pending = self._state.pending
            if pending is None or pending["id"] != batch_id:
                return False
            self._roll_day()
            self._state.sent += int(pending["size"])
            self._state.dropped = _subtract(self._state.dropped, pending["dropped"])
            self._state.dropped_samples = _subtract(
                self._state.dropped_samples, pending["dropped_samples"]
            )
            self._state.delete += [*pending["windows"], *pending["samples"]]
            self._drop_pending()
            self._commit()
            return True

    def stats(self) -> OutboxStats:
        with self._lock:
            self._roll_day()
            return OutboxStats(
                buffered_windows=len(self._names(WINDOW)),
                buffered_samples=len(self._names(SAMPLE)),
                dropped_windows=sum(self._state.dropped.values()),
                dropped=dict(self._state.dropped),
                dropped_samples=dict(self._state.dropped_samples),
                corrupt_files=self._state.corrupt_files,
                bytes_sent_today=self._state.sent,
                day=self._state.day,
                pending_batch=(self._state.pending or {}).get("id"),
            )
