"""The agent loop: check in, apply what the control plane wants, serve the active model.

Order of start: recover the slots (a crash may have left half an install), start the local
OpenAI API over the active slot (it answers 503 while there is none), then enroll if this box
has no credential. Then, forever: check in (inventory, active/previous model, pending action
statuses) with If-None-Match; on a new desired state whose model differs from the active one,
run the Installer (download, verify, install, health-check, switch) and report its statuses on
the next check-in; sleep the poll interval with +-10% jitter so a fleet rebooted together does
not poll in lockstep. When the server is unreachable the loop backs off exponentially with full
jitter (capped), logging once per streak; the API keeps serving whatever happens to the network,
because serving runs in its own thread and never waits on the control plane.

Heavy parts are loaded only when needed: the runtime at the first request after a model became
active, the installer (cryptography, registry client) only when there is something to install.
An install runs in the loop thread, so no check-in happens during a download: one apply at a
time per data dir is what the Installer requires, and its statuses are reported right after.
``DATA/agent-status.json`` is rewritten atomically after each step, for operators and tests.

Telemetry: the API counts every request in the ``Aggregator`` (windows of aggregates, never
text unless the blueprint opts in to redacted samples); each step moves closed windows to the
on-disk ``Outbox`` and posts what today's byte budget allows, gzip-compressed and idempotent by
batch id. While the server is unreachable, windows wait on disk (capped; drops are counted and
reported in the next batch). The policy comes with the desired state.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from slmops.agent.adapter_slots import AdapterSlots
from slmops.agent.backoff import Backoff, jittered
from slmops.agent.client import DeviceClient, PendingApproval, Rejected, Unreachable
from slmops.agent.config import AgentConfig
from slmops.agent.inventory import collect
from slmops.agent.openai_api import ApiError, OpenAIServer, Served, serve_in_thread
from slmops.agent.outbox import Outbox
from slmops.agent.slots import SlotStore
from slmops.agent.telemetry import Aggregator
from slmops.core.atomic import write_json_atomic
from slmops.core.errors import ConfigError
from slmops.core.resources import own_peak_rss_bytes
from slmops.protocol.device import (
    ActionStatus,
    ActiveModel,
    CheckIn,
    DesiredModel,
    DesiredState,
    EnrollRequest,
    GenerationDefaults,
)
from slmops.protocol.fleet import DeviceActionState as S
from slmops.protocol.telemetry import TelemetryPolicy
from slmops.runtimes.base import Runtime

if TYPE_CHECKING:  # imported where used: the adapter path loads only when there is work
    from slmops.agent.adapters import AdapterSync

log = logging.getLogger("slmops.agent")
STATUS_FILE = "agent-status.json"
TELEMETRY_DIR = "telemetry"
DESIRED_FILE = "desired.json"


class Agent:
    def __init__(self, cfg: AgentConfig, *, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.server_url = cfg.check_server()
        self.rng = rng or random.Random()
        self.backoff = Backoff(
            base=min(1.0, cfg.poll_seconds or 1.0), cap=cfg.backoff_cap_seconds, rng=self.rng
        )
        self.client = DeviceClient(self.server_url, cfg.data_dir)
        self.store = SlotStore(cfg.data_dir)
        self._adapters = AdapterSlots(cfg.data_dir)
        # a desired adapter state whose apply failed: not retried until it changes or a restart
        self._adapter_failed: tuple[str, str | None, str | None, bool] | None = None
        self.device_id = ""
        self.etag: str | None = None
        self.desired: DesiredState | None = None
        self.pending: dict[tuple[str | None, str], ActionStatus] = {}
        self.stats: dict[str, Any] = {"checkins": 0, "not_modified": 0, "failures": 0}
        self.api: OpenAIServer | None = None
        self._stop = threading.Event()
        self._serve_lock = threading.Lock()
        self._served: Served | None = None
        self._served_digest: str | None = None
        policy = TelemetryPolicy()
        self.telemetry = Aggregator(policy)
        self.outbox: Outbox | None = None  # opened in start(), once the data dir exists
        self._policy = policy

    # start / stop ----------------------------------------------------------------------------
    def start(self) -> None:
        """Recover slots, start serving, and check that a first start can enroll."""
        cfg = self.cfg
        for key in cfg.trusted_keys:
            if not key.is_file():
                raise ConfigError("trusted key file not found", where=key, hint="check the path")
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if self.client.credential() is None and not cfg.enroll_token:
            raise ConfigError(
                "this device is not enrolled and no enrollment token was given",
                where="--enroll-token",
                hint="ask an operator: slmops server enrollment-token create",
            )
        self.device_id = cfg.resolved_device_id()
        for action in self.store.recover().actions:
            log.warning("slot recovery: %s", action)
        for action in self._adapters.recover().actions:
            log.warning("adapter slot recovery: %s", action)
        try:
            self.desired = DesiredState.model_validate_json(
                (cfg.data_dir / DESIRED_FILE).read_bytes()
            )
        except (OSError, ValueError):
            self.desired = None
        self.outbox = Outbox(cfg.data_dir / TELEMETRY_DIR, self._policy)
        if self.desired is not None:
            self._set_policy(self.desired.telemetry)
        self.api, _ = serve_in_thread(
            self.serving, cfg.api_host, cfg.api_port, recorder=self.telemetry, api_key=self._api_key
        )
        log.info("OpenAI API on http://%s:%d/v1", cfg.api_host, self.api.server_address[1])

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self.api is not None:
            self.api.shutdown()
            self.api.server_close()
        with self._serve_lock:
            if self._served is not None:
                self._served.runtime.close()
                self._served = None
        self.client.close()
        self._write_status("stopped")

    def run(self) -> None:
        """Run until SIGTERM/SIGINT; the current step finishes, then everything closes."""

        def _handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            self._stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _handler)
        self.start()
        try:
            while not self._stop.is_set():
                try:
                    delay = self.step()
                except ConfigError:  # a first start that cannot enroll: bad input, exit 2
                    raise
                except Exception as exc:  # a bug or a full disk must not stop the serving
                    log.exception("agent step failed")
                    delay = self._failed(f"{type(exc).__name__}: {exc}", "error")
                self._stop.wait(delay)
        finally:
            self.close()

    # one step --------------------------------------------------------------------------------
    def step(self) -> float:
        """Enroll if needed, check in, apply a changed desired model; seconds until the next."""
        try:
            if self.client.credential() is None:
                self._enroll()
            try:
                result = self._checkin()
            except Rejected as exc:
                if exc.status != 401 or not self.cfg.enroll_token:
                    raise
                log.warning("credential refused (%s); enrolling again", exc.message)
                self._enroll()
                result = self._checkin()
        except Unreachable as exc:
            return self._failed(exc.render(), "backoff")
        except PendingApproval as exc:
            return self._failed(exc.render(), "pending-approval")
        except Rejected as exc:
            return self._failed(exc.render(), "rejected")
        if self.backoff.failures:
            log.warning("server reachable again after %d failure(s)", self.backoff.failures)
        self.backoff.reset()
        if result is not None:
            self._set_policy(result.telemetry)
            self._apply_if_needed(result)
        self._send_telemetry()
        self._write_status("ok")
        poll = self.cfg.poll_seconds or (self.desired.poll_seconds if self.desired else 60.0)
        return jittered(poll, self.rng)

    def _failed(self, message: str, state: str) -> float:
        if self.backoff.failures == 0:  # once per streak: a dead link must not flood the log
            log.warning("check-in failed, backing off: %s", message)
        self.stats["failures"] += 1
        delay = self.backoff.next_delay()
        self._write_status(state, error=message, retry_in=delay)
        return delay

    def _enroll(self) -> None:
        token = self.cfg.enroll_token
        if not token:
            raise Rejected(401, "no credential and no enrollment token", hint="pass --enroll-token")
        # The current (or pending) credential, if any, proves this is the enrolled box; without
        # it the server holds an existing id's re-enrollment for an operator's approval.
        req = EnrollRequest(
            enrollment_token=token,
            device_id=self.device_id,
            inventory=collect(self.cfg),
            credential=self.client.credential(),
        )
        first = self.stats["checkins"] == 0 and self.client.credential() is None
        try:
            self.client.enroll(req)
        except Rejected as exc:
            # On a first start a refused token is bad input (exit 2): waiting will not fix it.
            # Later (a revoked credential) the agent keeps serving and retries with backoff.
            if first and exc.status in (401, 403, 422):
                raise ConfigError(exc.message, where="--enroll-token", hint=exc.hint) from None
            raise
        log.info("enrolled as %s", self.device_id)

    def _checkin(self) -> DesiredState | None:
        active, previous = self.store.active(), self.store.previous()
        sent = list(self.pending.values())[-64:]
        current = active[1] if active else None
        lora = self._adapters.loaded_for(current)
        if current is not None and lora is not None:
            current = current.model_copy(update={"adapter": lora[1]})
        body = CheckIn(
            inventory=collect(self.cfg),
            active=current,
            previous=previous[1] if previous else None,
            actions=sent,
        )
        result = self.client.checkin(body, self.etag)
        for st in sent:  # delivered; keep only what changed meanwhile
            key = (st.rollout_id, st.version)
            if self.pending.get(key) is st:
                del self.pending[key]
        self.stats["checkins"] += 1
        self.etag = result.etag
        if result.desired is None:
            self.stats["not_modified"] += 1
            return None
        self.desired = result.desired
        write_json_atomic(
            self.cfg.data_dir / DESIRED_FILE, result.desired.model_dump(mode="json", by_alias=True)
        )
        return result.desired

    def _report(self, status: ActionStatus) -> None:
        """Queue a status for the next check-in and, for a rollout, post it now (best effort)
        so operators see downloading/verifying/... while the install runs."""
        key = (status.rollout_id, status.version)
        self.pending[key] = status
        log.info("action %s %s %s", status.version, status.state.value, status.detail)
        if status.rollout_id is None or self.client.credential() is None:
            return
        try:
            self.client.report_actions([status])
        except (Unreachable, Rejected) as exc:
            log.debug("progress report not delivered (kept for the next check-in): %s", exc)
            return
        if self.pending.get(key) is status:
            del self.pending[key]

    def _apply_if_needed(self, desired: DesiredState) -> None:
        """Install a new desired model; a failed apply is reported, and retried only when the
        desired state changes or the agent restarts (no retry storm on a broken bundle)."""
        want = desired.model
        active = self.store.active()
        if want is None:
            return
        if active is not None and active[1].digest == want.manifest_digest:
            # the same content under another version (an unchanged variant re-shipped): take
            # the new name so check-ins, the API and the next rollout see the right version
            self.store.relabel(
                ActiveModel(
                    name=want.name,
                    version=want.version,
                    variant=want.variant,
                    digest=want.manifest_digest,
                )
            )
            if self._adapters.must_change(want.adapter):
                # the adapter's final status is this device's report for the rollout: the
                # model's "already running" must not count as success before it is in place
                self._apply_adapter(want)
                return
            if want.rollout_id:  # e.g. told to revert to what it kept serving after a failure
                done = S.ROLLED_BACK if want.revert else S.ACTIVE
                self._report(
                    ActionStatus(
                        rollout_id=want.rollout_id,
                        version=want.version,
                        state=done,
                        detail=f"already running {want.name}:{want.version} ({want.variant})",
                    )
                )
            self._apply_adapter(want)
            return
        from slmops.agent.install import Installer  # heavy: only when there is work
        from slmops.agent.pull_source import pull_source

        threads = self.cfg.threads or self.cfg.model_cores or 2
        try:
            installer = Installer(self.cfg.data_dir, self.cfg.trusted_keys, threads=threads)
            # the control plane's registry (with the device credential), or the blueprint's
            # external registry (never with it: anonymous or a configured token)
            source = pull_source(want, self.cfg, self.server_url, self.client.credential())
        except Exception as exc:  # a bad key file or repository name: report, do not crash
            self._report(
                ActionStatus(
                    rollout_id=want.rollout_id,
                    version=want.version,
                    state=S.FAILED,
                    stage=S.DOWNLOADING,
                    detail=f"cannot start the install: {exc}"[:2000],
                )
            )
            return
        # a release of a model and an adapter: the model's own final state must not count as
        # the device's outcome for the rollout before the adapter is in place (a wave could
        # pass on it); it is held back, and the adapter's final state reports instead
        follows = want.rollout_id is not None and self._adapters.must_change(want.adapter)
        held: list[ActionStatus] = []

        def report(st: ActionStatus) -> None:
            final = st.state in (S.ACTIVE, S.ROLLED_BACK) and st.stage is None
            if follows and final and st.version == want.version:
                held.append(st)
                st = st.model_copy(update={"rollout_id": None})  # logged, not the outcome
            self._report(st)

        try:
            installer.apply(want, source, report)
            if installer.last_health is not None:
                self.telemetry.record_health(installer.last_health.ok)
        finally:
            source.close()
        outcome = self._apply_adapter(want)
        if held and (outcome is None or outcome.final is None):
            self._report(held[-1])  # no adapter step reported: the model's state decides

    def _apply_adapter(self, want: DesiredModel) -> AdapterSync | None:
        """Load, switch or unload the LoRA adapter the desired state names over the running
        model (agent/adapters.py); the model is never touched, only the adapter's bytes move.
        A failed apply is retried only when that desired state changes, or after a restart."""
        active = self.store.active()
        if active is None or active[1].digest != want.manifest_digest:
            return None  # the model install failed: keep whatever adapter state there is
        adapter = want.adapter.digest if want.adapter else None
        key = (want.manifest_digest, adapter, want.rollout_id, want.revert)
        if key == self._adapter_failed:
            log.info("adapter apply failed for this desired state; waiting for it to change")
            return None
        from slmops.agent.adapters import sync_adapter

        done = sync_adapter(
            self.cfg,
            self.server_url,
            self.client.credential(),
            want,
            active,
            self._report,
        )
        failed = done.final is not None and done.final.state is S.FAILED
        self._adapter_failed = key if failed else None
        if done.fetch is not None:
            self.stats["adapter_fetch"] = done.fetch
        return done

    # serving ---------------------------------------------------------------------------------
    def _api_key(self) -> str | None:
        """The blueprint's API key for the local API (None: no key needed)."""
        desired = self.desired
        return desired.generation.api_key if desired is not None else None

    def serving(self) -> Served | None:
        """The API's provider: the active slot's runtime, loaded lazily, swapped on change."""
        active = self.store.active()
        defaults = self.desired.generation if self.desired else GenerationDefaults()
        with self._serve_lock:
            cur = self._served
            if active is None:
                return None
            model: ActiveModel = active[1]
            lora = self._adapters.loaded_for(model)
            key = model.digest + (f"+{lora[1].digest}" if lora else "")
            if cur is not None and self._served_digest == key:
                cur.defaults = defaults
                cur.model_id = f"{model.name}:{model.version}"  # relabelled re-ships
                return cur

            threads = self.cfg.threads or self.cfg.model_cores or 2
            try:
                runtime: Runtime = self._open(active[0], threads, lora[0] if lora else None)
            except Exception as exc:  # the client gets a clear 503, the agent keeps running
                raise ApiError(
                    503, f"the active model failed to load: {exc}", "unavailable"
                ) from None
            if cur is not None and self.api is not None:
                with self.api.lock:  # no generation is running on the old runtime
                    cur.runtime.close()
            self._served = Served(runtime, f"{model.name}:{model.version}", defaults)
            self._served_digest = key
            return self._served

    @staticmethod
    def _open(path: Path, threads: int, lora: Path | None) -> Runtime:
        """The model's runtime, with the adapter when one is loaded; an adapter that fails to
        load (it passed its health check, so this is rare) leaves the model serving alone."""
        from slmops.runtimes import open_runtime

        if lora is not None:
            from slmops.runtimes.llama_cpp import LlamaCppRuntime

            try:
                return LlamaCppRuntime(path, threads, 512, lora_path=lora)
            except Exception as exc:
                log.warning("the adapter failed to load, serving the model alone: %s", exc)
        return open_runtime(path, threads=threads)

    # telemetry -------------------------------------------------------------------------------
    def _set_policy(self, policy: TelemetryPolicy) -> None:
        if policy == self._policy:
            return
        self._policy = policy
        self.telemetry.set_policy(policy)
        if self.outbox is not None:
            self.outbox.set_policy(policy)

    def _send_telemetry(self) -> None:
        """Move closed windows to the outbox, then deliver what the budget allows; a batch the
        server cannot take is kept (network) or dropped with a warning (refused as invalid)."""
        if self.outbox is None or not self._policy.enabled:
            return
        active = self.store.active()
        if active is not None:  # requests count for the model that served them
            model = active[1]
            want = self.desired.model if self.desired else None
            rollout = want.rollout_id if want and want.manifest_digest == model.digest else None
            lora = self._adapters.loaded_for(model)  # an adapter switch closes the window
            adapter = f"{lora[1].name}:{lora[1].version}" if lora else None
            self.telemetry.set_model(
                model.name, model.version, model.variant, rollout, adapter=adapter
            )
        self.telemetry.record_rss(own_peak_rss_bytes())
        self.outbox.put(windows=self.telemetry.close_due(), samples=self.telemetry.take_samples())
        for _ in range(8):  # a few batches per step: a long outage drains over several polls
            ready = self.outbox.next_batch()
            if ready is None:
                return
            batch_id, payload = ready
            try:
                self.client.post_telemetry(payload)
            except Unreachable as exc:
                log.debug("telemetry batch %s kept for later: %s", batch_id, exc)
                return
            except Rejected as exc:
                if exc.status in (401, 403):
                    return  # the credential is being replaced; try again after re-enrolling
                log.warning("telemetry batch %s refused, dropped: %s", batch_id, exc.message)
            self.outbox.ack(batch_id)
            self.stats["telemetry_batches"] = self.stats.get("telemetry_batches", 0) + 1

    # status ----------------------------------------------------------------------------------
    def _write_status(self, state: str, **extra: Any) -> None:
        active = self.store.active()
        loaded = self._adapters.loaded_for(active[1] if active else None)
        doc = {
            "state": state,
            "device_id": self.device_id,
            "time": time.time(),
            "backoff_failures": self.backoff.failures,
            "active": active[1].model_dump(mode="json") if active else None,
            "adapter": loaded[1].model_dump(mode="json") if loaded else None,
            "api_port": self.api.server_address[1] if self.api else None,
            **self.stats,
            **extra,
        }
        try:
            write_json_atomic(self.cfg.data_dir / STATUS_FILE, doc)
        except OSError as exc:
            log.debug("cannot write the status file: %s", exc)
