"""Two model slots (A/B) and one state file that says which one serves.

Layout under ``DATA_DIR/slots``: ``a/``, ``b/`` and ``state.json``. The state file is the single
source of truth: it names the active slot, the kept previous slot and the model in each, and it
changes only by one atomic rename (core.atomic), so a kill -9 leaves either the old or the new
state, never a mix.

Invariant: at every instant ``state.json`` names only slots that are complete and verified (a
slot is sealed by a marker file, ``.slmops-slot.json``, written after every file was verified
and fsynced) or names nothing. To get there:

- downloads and verification happen in a separate staging folder (install.py), never in a slot;
- with two slots the idle slot IS the kept previous model, so `prepare_idle` first rewrites the
  state without it (one rename), then wipes the folder. The older kept model is therefore
  dropped only once the new one is fully downloaded and verified in staging;
- `switch_to` names a slot only after it was sealed, and keeps the old active one as previous.

`recover` runs at startup: it removes temp leftovers and unreferenced (half-written) slots,
checks the active and previous slots against their markers (sizes; full re-hash on request),
and falls back to the previous model when the active one is broken.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from slmops.core.atomic import clean_stale_temps, fsync_tree, write_json_atomic
from slmops.core.config import StrictModel
from slmops.core.digest import sha256_file
from slmops.core.errors import CheckFailedError
from slmops.protocol.device import ActiveModel

SlotName = Literal["a", "b"]
SLOTS: tuple[SlotName, SlotName] = ("a", "b")
STATE_FILE = "state.json"
MARKER = ".slmops-slot.json"


class SlotFile(StrictModel):
    name: str
    size: int
    digest: str


class SlotMarker(StrictModel):
    """Written last into a slot: the model it holds and every file's verified size and digest."""

    model: ActiveModel
    files: list[SlotFile]


class SlotState(StrictModel):
    active: SlotName | None = None
    previous: SlotName | None = None
    models: dict[SlotName, ActiveModel] = Field(default_factory=dict)


@dataclass
class Recovery:
    """What `recover` did, for the agent's log and its next check-in."""

    actions: list[str] = field(default_factory=list)
    active: ActiveModel | None = None


class SlotStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "slots"
        self.state_path = self.root / STATE_FILE

    # state ------------------------------------------------------------------------------------
    def state(self) -> SlotState:
        try:
            return SlotState.model_validate_json(self.state_path.read_bytes())
        except FileNotFoundError:
            return SlotState()
        except (ValidationError, OSError) as exc:
            raise CheckFailedError(
                f"slot state is unreadable: {exc}",
                where=self.state_path,
                hint="run recovery (agent start) or remove the file to start without a model",
            ) from None

    def _write(self, state: SlotState) -> None:
        # One rename replaces the whole state: this IS the switch.
        write_json_atomic(self.state_path, state.model_dump(mode="json"))

    def path(self, slot: SlotName) -> Path:
        return self.root / slot

    def active(self) -> tuple[Path, ActiveModel] | None:
        st = self.state()
        if st.active is None or st.active not in st.models:
            return None
        return self.path(st.active), st.models[st.active]

    def previous(self) -> tuple[Path, ActiveModel] | None:
        st = self.state()
        if st.previous is None or st.previous not in st.models:
            return None
        return self.path(st.previous), st.models[st.previous]

    def idle_slot(self) -> SlotName:
        """The slot that is not active (it may hold the kept previous model)."""
        return "b" if self.state().active == "a" else "a"

    # transitions ------------------------------------------------------------------------------
    def prepare_idle(self) -> SlotName:
        """Forget the idle slot in the state (one rename), then wipe and recreate its folder."""
        st = self.state()
        slot = self.idle_slot()
        if st.previous == slot or slot in st.models:
            models = {k: v for k, v in st.models.items() if k != slot}
            previous = None if st.previous == slot else st.previous
            self._write(SlotState(active=st.active, previous=previous, models=models))
        shutil.rmtree(self.path(slot), ignore_errors=True)
        self.path(slot).mkdir(parents=True)
        return slot

    def seal(self, slot: SlotName, model: ActiveModel, files: list[SlotFile]) -> None:
        """Mark a fully written, verified slot: fsync its files, then write the marker last."""
        fsync_tree(self.path(slot))
        marker = SlotMarker(model=model, files=files)
        write_json_atomic(self.path(slot) / MARKER, marker.model_dump(mode="json"))

    def switch_to(self, slot: SlotName, model: ActiveModel) -> None:
        """Make a sealed slot active and keep the old active one as previous (one rename)."""
        problem = self.check(slot, model)
        if problem:
            raise CheckFailedError(f"slot {slot} is not complete: {problem}", where=self.root)
        st = self.state()
        keep = st.active if st.active != slot else None
        models = {k: v for k, v in st.models.items() if k == keep}
        models[slot] = model
        self._write(SlotState(active=slot, previous=keep, models=models))

    def relabel(self, model: ActiveModel) -> bool:
        """Name the active model ``model`` when it is the same content (same manifest digest)
        under another version: a version that re-ships an unchanged variant. One rename."""
        st = self.state()
        if st.active is None or st.active not in st.models:
            return False
        current = st.models[st.active]
        if current.digest != model.digest or current == model:
            return False
        models = {**st.models, st.active: model}
        self._write(SlotState(active=st.active, previous=st.previous, models=models))
        return True

    def rollback(self) -> ActiveModel:
        """Swap active and previous: instant, no download, no new health check."""
        st = self.state()
        if st.previous is None or st.previous not in st.models:
            raise CheckFailedError("no previous model is kept; nothing to roll back to")
        problem = self.check(st.previous, st.models[st.previous])
        if problem:
            raise CheckFailedError(f"the kept previous model is broken: {problem}")
        self._write(SlotState(active=st.previous, previous=st.active, models=st.models))
        return st.models[st.previous]

    # checks -----------------------------------------------------------------------------------
    def check(self, slot: SlotName, model: ActiveModel, *, full: bool = False) -> str | None:
        """None when the slot holds `model` complete; else what is wrong. `full` re-hashes."""
        d = self.path(slot)
        try:
            marker = SlotMarker.model_validate_json((d / MARKER).read_bytes())
        except (OSError, ValidationError):
            return "no valid marker (installation did not finish)"
        if marker.model.digest != model.digest:
            # compared by content: a later version re-shipping the same variant relabels the
            # state (see relabel) without rewriting the slot
            return f"holds {marker.model.name}:{marker.model.version}, state says {model.version}"
        for f in marker.files:
            p = d / f.name
            if not p.is_file() or p.is_symlink() or p.stat().st_size != f.size:
                return f"{f.name} is missing or not {f.size} bytes"
            if full and sha256_file(p) != f.digest:
                return f"{f.name} does not match its digest"
        return None

    def recover(self, *, full: bool = False) -> Recovery:
        """Bring the store to a consistent state after any crash; report what changed."""
        rec = Recovery()
        self.root.mkdir(parents=True, exist_ok=True)
        if n := clean_stale_temps(self.root):
            rec.actions.append(f"removed {n} temp file(s) left by an interrupted write")
        try:
            st = self.state()
        except CheckFailedError as exc:
            rec.actions.append(f"state unreadable, starting without a model: {exc.message}")
            st = SlotState()
        models = dict(st.models)
        active, previous = st.active, st.previous
        for role, slot in (("previous", previous), ("active", active)):
            if slot is None:
                continue
            problem = self.check(slot, models[slot], full=full) if slot in models else "no model"
            if problem:
                rec.actions.append(f"{role} slot {slot} is broken ({problem}); dropped")
                models.pop(slot, None)
                if role == "previous":
                    previous = None
                else:
                    active, previous = previous, None
                    if active is not None:
                        rec.actions.append(f"fell back to the previous model in slot {active}")
        new = SlotState(active=active, previous=previous, models=models)
        if new != st:
            self._write(new)
        for slot in SLOTS:
            if slot not in (active, previous) and self.path(slot).exists():
                shutil.rmtree(self.path(slot), ignore_errors=True)
                rec.actions.append(f"removed unreferenced slot {slot} (an unfinished install)")
            with contextlib.suppress(OSError):
                clean_stale_temps(self.path(slot))
        rec.active = models.get(active) if active else None
        return rec
