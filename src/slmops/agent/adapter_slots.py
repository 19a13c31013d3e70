"""Two adapter slots beside the model slots: the loaded LoRA adapter and the kept previous one.

Layout under ``DATA_DIR/adapters``: ``a/``, ``b/`` and ``state.json``, with exactly the rules of
the model slots (slots.py, whose code this reuses): the state file names only sealed slots and
changes by one atomic rename, so a kill -9 during an adapter install leaves the device on its
previous adapter. A slot holds ``adapter.gguf`` and ``adapter.json`` (the verified
AdapterDescriptor, so the agent can tell which model variants the adapter fits without the
network). The state's model entry for a slot names the adapter: ``name``, ``version``,
``digest`` (the signed adapter artifact digest) and ``variant`` (the base variant name it was
installed over).

One addition to the model slots: an adapter can be switched off (`clear`) while the model keeps
serving; the adapter that was loaded becomes the kept previous one.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from slmops.agent.slots import SlotState, SlotStore
from slmops.bundle.adapter_meta import ADAPTER_FILE, AdapterDescriptor
from slmops.core.errors import CheckFailedError
from slmops.protocol.device import ActiveAdapter, ActiveModel, DesiredAdapter

DESCRIPTOR_FILE = "adapter.json"


class AdapterSlots(SlotStore):
    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.root = Path(data_dir) / "adapters"
        self.state_path = self.root / "state.json"

    def clear(self) -> bool:
        """Unload: no adapter active, the one that was becomes previous (one rename)."""
        st = self.state()
        if st.active is None:
            return False
        models = {k: v for k, v in st.models.items() if k == st.active}
        self._write(SlotState(active=None, previous=st.active, models=models))
        return True

    def must_change(self, want: DesiredAdapter | None) -> bool:
        """Whether applying `want` loads, switches or unloads an adapter: the agent loop asks
        before reporting a model as already running, because then the adapter's outcome, not
        the model's, is the device's report for the rollout. An unreadable state counts as no
        adapter loaded (recover() at start repairs it)."""
        try:
            current = self.active()
        except CheckFailedError:
            current = None
        if want is None:
            return current is not None
        return current is None or current[1].digest != want.digest

    def descriptor(self, slot_path: Path) -> AdapterDescriptor | None:
        try:
            return AdapterDescriptor.model_validate_json((slot_path / DESCRIPTOR_FILE).read_bytes())
        except (OSError, ValidationError):
            return None

    def loaded_for(self, model: ActiveModel | None) -> tuple[Path, ActiveAdapter] | None:
        """The active adapter's GGUF and name, if it fits `model` (the running variant). An
        unreadable adapter state means no adapter: the model must keep serving."""
        try:
            active = self.active()
        except CheckFailedError:
            return None
        if active is None or model is None:
            return None
        desc = self.descriptor(active[0])
        if desc is None or desc.variant(model.digest) is None:
            return None
        entry = active[1]
        named = ActiveAdapter(name=entry.name, version=entry.version, digest=entry.digest)
        return active[0] / ADAPTER_FILE, named


def as_entry(desc: AdapterDescriptor, digest: str, variant: str) -> ActiveModel:
    """How the slot state names an adapter (the model slots' record type, reused)."""
    return ActiveModel(name=desc.name, version=desc.version, variant=variant, digest=digest)
