"""Apply a desired model: download, verify, install into the idle slot, health-check, switch.

The states reported are the wire's DeviceActionState, in order:

    downloading -> verifying -> installing -> health-checking -> active
                 \\-> failed (stage + detail; the old model keeps serving)
    after the switch, a failed post-switch check swaps back -> rolled-back

Crash safety comes from the order of effects, not from cleanup code (a kill -9 runs none):
bytes go to ``DATA_DIR/staging/<manifest hex>`` (kept for resume), the signature and metadata
are checked before any layer is downloaded, layer bytes are re-hashed before the idle slot is
touched, the slot is sealed (marker) before the state names it, and the state changes by one
rename (slots.py). Whatever instant the process dies, a restart's `SlotStore.recover` finds the
old model or the new one, complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops.agent import crash_point
from slmops.agent.apply_steps import StepFailed, disk_full, failure, staging_dir
from slmops.agent.fetch import BlobSource, FetchedVariant, FetchStats, fetch_layers, fetch_metadata
from slmops.agent.health import HealthResult, health_check
from slmops.agent.slots import SlotFile, SlotName, SlotStore
from slmops.agent.verify_variant import VerifiedVariant, verify_layers, verify_metadata
from slmops.bundle.signing import load_trusted_keys
from slmops.core.errors import CheckFailedError
from slmops.core.safepath import safe_join
from slmops.protocol.device import ActionStatus, ActiveModel, DesiredModel
from slmops.protocol.fleet import DeviceActionState as S

Report = Callable[[ActionStatus], None]


class Installer:
    """Installs desired models into a SlotStore. The caller (the agent loop) runs one apply
    at a time per data dir: there is no lock between two processes."""

    def __init__(
        self,
        data_dir: Path,
        trusted_keys: Sequence[Path] | Mapping[str, Ed25519PublicKey],
        *,
        threads: int,
        n_ctx: int = 256,
        max_latency_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.store = SlotStore(self.data_dir)
        self.staging_root = self.data_dir / "staging"
        self.keys = (
            dict(trusted_keys)
            if isinstance(trusted_keys, Mapping)
            else load_trusted_keys([Path(p) for p in trusted_keys])
        )
        self.threads, self.n_ctx, self.max_latency_s = threads, n_ctx, max_latency_s
        self.last_fetch: FetchStats | None = None
        self.last_health: HealthResult | None = None

    def apply(self, desired: DesiredModel, source: BlobSource, report: Report) -> ActionStatus:
        """Bring `desired` into service; returns (and reports) the final ActionStatus."""

        def status(state: S, stage: S | None = None, detail: str = "") -> ActionStatus:
            st = ActionStatus(
                rollout_id=desired.rollout_id,
                version=desired.version,
                state=state,
                stage=stage,
                detail=detail[:2000],
            )
            report(st)
            return st

        # a revert the control plane ordered ends in rolled-back, whichever way it was reached
        done = S.ROLLED_BACK if desired.revert else S.ACTIVE
        stage = S.SCHEDULED
        try:
            current, kept = self.store.active(), self.store.previous()
            if current is not None and current[1].digest == desired.manifest_digest:
                self.store.relabel(self._desired_model(desired))
                return status(done, detail="already active")
            if desired.revert and kept is not None and kept[1].digest == desired.manifest_digest:
                return self.revert(report, rollout_id=desired.rollout_id)
            stage = S.DOWNLOADING
            status(S.DOWNLOADING)
            staging = self._staging_for(desired.manifest_digest)
            fetched = fetch_metadata(
                source, desired.bundle_digest, desired.manifest_digest, staging
            )
            stage = S.VERIFYING
            variant = self._verify_metadata(fetched, desired)
            stage = S.DOWNLOADING
            fetch_layers(source, fetched, staging)
            self.last_fetch = fetched.stats
            stage = S.VERIFYING
            status(S.VERIFYING)
            crash_point("verify")
            verify_layers(variant, fetched.files)
            stage = S.INSTALLING
            status(S.INSTALLING)
            model = self._model(variant)
            slot = self._install(variant, fetched)
            stage = S.HEALTH_CHECKING
            status(S.HEALTH_CHECKING)
            crash_point("health")
            self._health(self.store.path(slot))
            crash_point("switch")
            self.store.switch_to(slot, model)
            crash_point("switched")
        except Exception as exc:  # refusals, I/O, and bugs: reported, never fatal to the agent
            return status(S.FAILED, *failure(exc, stage))
        problem = self.store.check(slot, model)  # post-switch: the state names a whole slot
        if problem:
            # recover() drops the broken active slot and falls back to the kept one (or none)
            actions = "; ".join(self.store.recover().actions)
            return status(S.ROLLED_BACK, S.HEALTH_CHECKING, f"post-switch check: {actions}")
        shutil.rmtree(staging, ignore_errors=True)
        return status(done, detail=self.last_health.detail if self.last_health else "")

    def revert(self, report: Report, *, rollout_id: str | None = None) -> ActionStatus:
        """Control-plane rollback: swap back to the kept previous model instantly."""
        current = self.store.active()
        version = current[1].version if current else "none"
        try:
            restored = self.store.rollback()
        except CheckFailedError as exc:
            st = ActionStatus(
                rollout_id=rollout_id,
                version=version,
                state=S.FAILED,
                stage=S.INSTALLING,
                detail=exc.render(),
            )
        else:
            st = ActionStatus(
                rollout_id=rollout_id,
                version=restored.version,
                state=S.ROLLED_BACK,
                detail=f"back on {restored.name}:{restored.version} ({restored.variant})",
            )
        report(st)
        return st

    # steps ------------------------------------------------------------------------------------
    def _staging_for(self, manifest_digest: str) -> Path:
        """This target's staging folder; other targets' leftovers are dropped (disk is scarce)."""
        return staging_dir(self.data_dir, self.staging_root.name, manifest_digest, "manifest")

    def _verify_metadata(self, fetched: FetchedVariant, desired: DesiredModel) -> VerifiedVariant:
        variant = verify_metadata(
            fetched.bundle_index,
            desired.bundle_digest,
            fetched.signatures,
            fetched.manifest,
            desired.manifest_digest,
            fetched.config,
            self.keys,
        )
        got = (variant.name, variant.version, variant.descriptor.name)
        if got != (desired.name, desired.version, desired.variant):
            raise StepFailed(
                S.VERIFYING,
                f"the signed bundle holds {got[0]}:{got[1]} variant {got[2]}, "
                f"not {desired.name}:{desired.version} variant {desired.variant}",
            )
        return variant

    def _install(self, variant: VerifiedVariant, fetched: FetchedVariant) -> SlotName:
        """Materialise the verified files under their titles in the idle slot, then seal it."""
        slot = self.store.prepare_idle()
        root = self.store.path(slot)
        files: list[SlotFile] = []
        try:
            for i, layer in enumerate(variant.layers):
                target = safe_join(root, layer.title)  # titles were checked; checked again
                target.parent.mkdir(parents=True, exist_ok=True)
                src = fetched.files[layer.digest]
                try:
                    os.link(src, target)  # staging and slots share a file system: no copy
                except OSError:
                    shutil.copyfile(src, target)
                files.append(SlotFile(name=layer.title, size=layer.size, digest=layer.digest))
                if i == 0:
                    crash_point("install")
            self.store.seal(slot, self._model(variant), files)
        except OSError as exc:
            shutil.rmtree(root, ignore_errors=True)
            full = disk_full(exc, root)
            if full is exc:
                raise
            raise full from None
        return slot

    @staticmethod
    def _desired_model(desired: DesiredModel) -> ActiveModel:
        return ActiveModel(
            name=desired.name,
            version=desired.version,
            variant=desired.variant,
            digest=desired.manifest_digest,
        )

    @staticmethod
    def _model(variant: VerifiedVariant) -> ActiveModel:
        return ActiveModel(
            name=variant.name,
            version=variant.version,
            variant=variant.descriptor.name,
            digest=variant.manifest_digest,
        )

    def _health(self, path: Path) -> None:
        result = health_check(
            path, threads=self.threads, n_ctx=self.n_ctx, max_latency_s=self.max_latency_s
        )
        self.last_health = result
        if not result.ok:
            raise StepFailed(S.HEALTH_CHECKING, result.detail)
