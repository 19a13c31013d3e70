"""Apply a desired LoRA adapter over the running model: fetch only the adapter, verify, install,
health-check, switch; keep the previous adapter for rollback.

The base does not move: the adapter artifact's index, manifest, config and signatures (a few
KB) are fetched and checked first (bundle/adapter_verify.py: signature by a trusted key, the
descriptor, subject = the base bundle the control plane named, the running variant listed),
then the one ``adapter.gguf`` layer (its card and evaluation stay in the registry: a device
has no use for them). The downloaded GGUF's header must list LoRA pairs of the descriptor's rank
and shapes that fit the running GGUF's tensors. Only then is it hardlinked into the idle adapter
slot, sealed, loaded with the base in a child process (generate a few tokens) and switched to
by one rename (adapter_slots.py). Any failure leaves the previous adapter (or none) loaded.

States reported (ActionStatus ``version`` = ``adapter NAME:VERSION``, ``rollout_id`` = the
desired model's): downloading, verifying, installing, health-checking, then active (rolled-back
when the control plane ordered a revert: ``want.revert``); or failed with the stage and why.
An adapter-only rollout (same model, another adapter) counts these statuses as the device's
report, so the rollout's health gate sees an adapter that fails its checks.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops.agent import crash_point
from slmops.agent.adapter_slots import DESCRIPTOR_FILE, AdapterSlots, as_entry
from slmops.agent.apply_steps import StepFailed, disk_full, failure, staging_dir
from slmops.agent.config import AgentConfig
from slmops.agent.fetch import BlobSource, FetchedVariant, fetch_metadata
from slmops.agent.health import HealthResult, health_check
from slmops.agent.slots import SlotFile, SlotName
from slmops.bundle.adapter_gguf import read_header
from slmops.bundle.adapter_meta import ADAPTER_FILE
from slmops.bundle.adapter_verify import (
    VerifiedAdapter,
    check_adapter_gguf,
    verify_adapter_metadata,
)
from slmops.bundle.layout import BundleFormatError, verify_stream
from slmops.core.atomic import write_bytes_atomic
from slmops.core.digest import sha256_bytes
from slmops.core.safepath import safe_join
from slmops.protocol.device import ActionStatus, ActiveModel, DesiredAdapter, DesiredModel
from slmops.protocol.fleet import DeviceActionState as S

Report = Callable[[ActionStatus], None]
STAGING = "adapter-staging"


@dataclass
class AdapterFetch:
    """Bytes this apply moved: the adapter layer and the metadata around it."""

    layer_bytes: int = 0
    metadata_bytes: int = 0
    resumed: int = 0


def label(adapter: DesiredAdapter) -> str:
    return f"adapter {adapter.name}:{adapter.version}"


class AdapterInstaller:
    """Installs desired adapters into AdapterSlots; one apply at a time per data dir."""

    def __init__(
        self,
        data_dir: Path,
        keys: Mapping[str, Ed25519PublicKey],
        *,
        threads: int,
        n_ctx: int = 256,
        max_latency_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.slots = AdapterSlots(self.data_dir)
        self.keys = dict(keys)
        self.threads, self.n_ctx, self.max_latency_s = threads, n_ctx, max_latency_s
        self.last_fetch: AdapterFetch | None = None
        self.last_health: HealthResult | None = None

    def apply(
        self,
        model: DesiredModel,
        running: tuple[Path, ActiveModel],
        source: BlobSource,
        report: Report,
    ) -> ActionStatus:
        """Load `model.adapter` over the running model (which must be `model`'s variant)."""
        adapter = model.adapter
        assert adapter is not None  # the caller checks; not input validation
        name = label(adapter)

        def status(state: S, stage: S | None = None, detail: str = "") -> ActionStatus:
            st = ActionStatus(
                rollout_id=model.rollout_id,
                version=name,
                state=state,
                stage=stage,
                detail=detail[:2000],
            )
            report(st)
            return st

        # a revert the control plane ordered ends in rolled-back, whichever way it was reached
        done = S.ROLLED_BACK if model.revert else S.ACTIVE
        stage = S.SCHEDULED
        base_dir, base = running
        try:
            current, kept = self.slots.active(), self.slots.previous()
            if current is not None and current[1].digest == adapter.digest:
                return status(done, detail="already loaded")
            if kept is not None and kept[1].digest == adapter.digest and self._fits(kept, base):
                self.slots.rollback()  # the kept adapter: instant, it was checked before
                return status(done, detail=f"switched back to the kept {name}")
            stage = S.DOWNLOADING
            status(S.DOWNLOADING)
            staging = self._staging(adapter.digest)
            fetched = fetch_metadata(source, adapter.digest, adapter.manifest_digest, staging)
            meta = len(fetched.bundle_index) + len(fetched.manifest) + len(fetched.config)
            meta += sum(len(m) + len(x) for m, x in fetched.signatures)
            stage = S.VERIFYING
            verified = self._verify(fetched, adapter, model, base)
            stage = S.DOWNLOADING
            dest = safe_join(staging, "blobs", verified.gguf.digest.split(":", 1)[1])
            got = source.fetch_blob(verified.gguf, dest)
            self.last_fetch = AdapterFetch(got.bytes, meta, got.resumed)
            stage = S.VERIFYING
            status(S.VERIFYING)
            crash_point("adapter-verify")
            self._verify_file(dest, verified, base_dir)
            stage = S.INSTALLING
            status(S.INSTALLING)
            slot = self._install(dest, verified, base)
            stage = S.HEALTH_CHECKING
            status(S.HEALTH_CHECKING)
            self._health(base_dir, self.slots.path(slot) / ADAPTER_FILE)
            crash_point("adapter-switch")
            self.slots.switch_to(slot, as_entry(verified.descriptor, verified.digest, base.variant))
        except Exception as exc:  # refusals, I/O, and bugs: reported, never fatal to the agent
            return status(S.FAILED, *failure(exc, stage))
        shutil.rmtree(staging, ignore_errors=True)
        health = self.last_health.detail if self.last_health else ""
        return status(done, detail=f"{name} loaded over {base.name}:{base.version}; {health}")

    def unload(
        self, report: Report, *, rollout_id: str | None = None, revert: bool = False
    ) -> ActionStatus | None:
        """The blueprint assigns no adapter: run the model alone, keep the adapter as previous.

        Outside a rollout the status is rolled-back (as it always was: the adapter went away).
        In a rollout it is the device's outcome: active when the new desired state is reached,
        rolled-back when that state is a revert the control plane ordered."""
        active = self.slots.active()
        if active is None or not self.slots.clear():
            return None
        st = ActionStatus(
            rollout_id=rollout_id,
            version=f"adapter {active[1].name}:{active[1].version}",
            state=S.ROLLED_BACK if revert or rollout_id is None else S.ACTIVE,
            detail="unloaded: no adapter is assigned to this device any more (kept as previous)",
        )
        report(st)
        return st

    # steps ------------------------------------------------------------------------------------
    def _fits(self, entry: tuple[Path, ActiveModel], base: ActiveModel) -> bool:
        desc = self.slots.descriptor(entry[0])
        return desc is not None and desc.variant(base.digest) is not None

    def _staging(self, digest: str) -> Path:
        return staging_dir(self.data_dir, STAGING, digest, "adapter")

    def _verify(
        self,
        fetched: FetchedVariant,
        adapter: DesiredAdapter,
        model: DesiredModel,
        base: ActiveModel,
    ) -> VerifiedAdapter:
        try:
            v = verify_adapter_metadata(
                fetched.bundle_index,
                adapter.digest,
                fetched.signatures,
                fetched.manifest,
                fetched.config,
                self.keys,
            )
        except BundleFormatError as exc:
            raise StepFailed(S.VERIFYING, exc.render()) from None
        want = (adapter.name, adapter.version, adapter.manifest_digest, adapter.layer_digest)
        got = (v.name, v.version, v.manifest_digest, v.gguf.digest)
        if got != want:
            raise StepFailed(S.VERIFYING, f"the signed adapter is {got}, the desired state {want}")
        if v.descriptor.base.bundle_digest != model.bundle_digest:
            b = v.descriptor.base
            raise StepFailed(
                S.VERIFYING,
                f"the adapter is for {b.name}:{b.version} ({b.bundle_digest}), not the base "
                f"{model.name}:{model.version} this device runs; refused",
            )
        if v.descriptor.variant(base.digest) is None:
            fits = ", ".join(x.name for x in v.descriptor.variants)
            raise StepFailed(
                S.VERIFYING,
                f"the adapter fits the variants {fits}; this device runs {base.variant} "
                f"({base.digest}); refused",
            )
        return v

    def _verify_file(self, path: Path, v: VerifiedAdapter, base_dir: Path) -> None:
        """Every byte against the signed digest, then the GGUF header against the descriptor
        and against the running GGUF's tensor shapes."""
        with path.open("rb") as fh:
            verify_stream(fh, v.gguf.digest, v.gguf.size, what=f"{ADAPTER_FILE}")
        ggufs = sorted(base_dir.glob("*.gguf"))
        if not ggufs:
            raise StepFailed(
                S.VERIFYING, "the running model has no GGUF file: adapters need llama.cpp"
            )
        base_header = read_header(ggufs[0])
        with path.open("rb") as fh:
            check_adapter_gguf(fh, v.descriptor, ADAPTER_FILE, base=base_header)

    def _install(self, src: Path, v: VerifiedAdapter, base: ActiveModel) -> SlotName:
        slot = self.slots.prepare_idle()
        root = self.slots.path(slot)
        try:
            target = root / ADAPTER_FILE
            try:
                os.link(src, target)  # staging and slots share a file system: no copy
            except OSError:
                shutil.copyfile(src, target)
            crash_point("adapter-install")
            desc = json.dumps(v.descriptor.model_dump(mode="json", by_alias=True)).encode()
            write_bytes_atomic(root / DESCRIPTOR_FILE, desc)
            files = [
                SlotFile(name=ADAPTER_FILE, size=v.gguf.size, digest=v.gguf.digest),
                SlotFile(name=DESCRIPTOR_FILE, size=len(desc), digest=sha256_bytes(desc)),
            ]
            self.slots.seal(slot, as_entry(v.descriptor, v.digest, base.variant), files)
        except OSError as exc:
            shutil.rmtree(root, ignore_errors=True)
            full = disk_full(exc, root)
            if full is exc:
                raise
            raise full from None
        return slot

    def _health(self, base_dir: Path, lora: Path) -> None:
        result = health_check(
            base_dir,
            threads=self.threads,
            n_ctx=self.n_ctx,
            max_latency_s=self.max_latency_s,
            lora=lora,
        )
        self.last_health = result
        if not result.ok:
            raise StepFailed(S.HEALTH_CHECKING, f"base + adapter: {result.detail}")


@dataclass
class AdapterSync:
    """What `sync_adapter` did: the final status it reported (None: nothing to do) and the
    bytes moved (for agent-status.json), if anything moved."""

    final: ActionStatus | None = None
    fetch: dict[str, float] | None = None


def sync_adapter(
    cfg: AgentConfig,
    server_url: str,
    token: str | None,
    want: DesiredModel,
    active: tuple[Path, ActiveModel],
    report: Report,
) -> AdapterSync:
    """What the agent loop runs after the model is in place: unload when no adapter is
    assigned, nothing when the assigned one is loaded, else an install from the control
    plane's registry. Every status carries the desired model's rollout id."""
    slots = AdapterSlots(cfg.data_dir)
    current = slots.active()
    if want.adapter is None:
        if current is None:
            return AdapterSync()
        unloader = AdapterInstaller(cfg.data_dir, {}, threads=1)
        return AdapterSync(unloader.unload(report, rollout_id=want.rollout_id, revert=want.revert))
    if current is not None and current[1].digest == want.adapter.digest:
        return AdapterSync()
    from slmops.agent.fetch import RegistrySource
    from slmops.bundle.signing import load_trusted_keys

    threads = cfg.threads or cfg.model_cores or 2
    try:
        keys = load_trusted_keys(list(cfg.trusted_keys))
        installer = AdapterInstaller(cfg.data_dir, keys, threads=threads)
        source = RegistrySource(
            server_url, want.adapter.repository, allow_http=cfg.allow_http, token=token
        )
    except Exception as exc:  # a bad key file or repository name: report, do not crash
        failed = ActionStatus(
            rollout_id=want.rollout_id,
            version=label(want.adapter),
            state=S.FAILED,
            stage=S.DOWNLOADING,
            detail=f"cannot start the adapter install: {exc}"[:2000],
        )
        report(failed)
        return AdapterSync(failed)
    t0 = time.perf_counter()
    try:
        final = installer.apply(want, active, source, report)
    finally:
        source.close()
    if installer.last_fetch is None:
        return AdapterSync(final)
    moved = {
        "layer_bytes": installer.last_fetch.layer_bytes,
        "metadata_bytes": installer.last_fetch.metadata_bytes,
        "resumed": installer.last_fetch.resumed,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return AdapterSync(final, moved)
