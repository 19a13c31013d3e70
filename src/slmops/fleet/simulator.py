"""Thousands of simulated agents in one asyncio process, speaking the real device protocol.

Each device enrolls with the enrollment token (``POST /device/v1/enroll``), then polls
``POST /device/v1/checkin`` with ``If-None-Match`` every poll interval (+-10 % jitter, the
first poll spread over one interval). When the desired state names a model it does not run,
it walks the agent's install phases (downloading, verifying, installing, health-checking,
then active, or failed at a stage with the configured probability), posting each as an action
report (``POST /device/v1/actions``) the way the agent does, keeping undelivered reports for
the next check-in. A revert to the kept model swaps slots and reports ``rolled-back``. Devices
with a model post one telemetry window (aggregates only, gzip) per policy window, and go
offline for a few polls at the configured rate. Blobs are not downloaded unless ``fetch``.

Time: ``accelerate`` K divides every interval and latency by K, so an hour-long staged rollout
runs in a minute against a server whose own gates use the same scale.

Scheduling is one heap of due events and a fixed set of workers (one per connection), so the
simulator's own queueing shows up as ``schedule_lag`` rather than inflating latencies.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import heapq
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from slmops.core.errors import UserInputError
from slmops.fleet.config import SimConfig as SimConfig
from slmops.fleet.devices import Device, Install, hardware_for, window_batch
from slmops.fleet.http import Answer, HttpFailure, Pool
from slmops.fleet.report import Stats, percentile
from slmops.protocol.device import ActionReport, ActionStatus
from slmops.protocol.fleet import DeviceActionState as S

POLL, PHASE, TELEMETRY = 0, 1, 2
PHASES = (S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.HEALTH_CHECKING)
JSON = "Content-Type: application/json\r\n"
OCI_ACCEPT = "application/vnd.oci.image.manifest.v1+json"


class Simulator:
    """Enroll once (``enroll``), then run one or more sessions (``simulate``), each with fresh
    statistics, against the same enrolled devices: a bench can apply a blueprint between or
    during sessions and read what the fleet saw for each."""

    def __init__(
        self, cfg: SimConfig, on_sample: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        cfg.check()
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.on_sample = on_sample
        self.stats = Stats()
        prefix = cfg.prefix or f"sim-{uuid.uuid4().hex[:6]}"
        self.all: list[Device] = []
        for i in range(cfg.devices):
            hw = hardware_for(i)
            labels = {"hw": hw.name, "site": f"site-{i % 16}", **cfg.labels}
            self.all.append(
                Device(i, f"{prefix}-{i:06d}", i % len(cfg.servers), hw, hw.inventory(labels))
            )
        self.devices: list[Device] = []
        self.pools: list[Pool] = []
        self._heap: list[tuple[float, int, int, Device]] = []
        self._seq = 0
        self._t0 = 0.0
        self._stopping = False

    # lifecycle -----------------------------------------------------------------------------
    def _open(self) -> None:
        if not self.pools:
            self.pools = [Pool(u, self.cfg.concurrency, self.cfg.timeout) for u in self.cfg.servers]

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
        self.pools = []

    async def run(self) -> dict[str, Any]:
        """Enroll, simulate ``duration`` seconds, and report (the CLI's whole run)."""
        if await self.enroll() == 0:
            seen = dict(self.stats.errors) or {
                str(k): v for k, v in self.stats.status.get("enroll", {}).items()
            }
            raise UserInputError(
                f"no device could enroll ({seen})",
                where=", ".join(self.cfg.servers),
                hint="check that the URL is the control plane and that the enrollment token is "
                "valid (slmops server enrollment-token create)",
            )
        return await self.simulate()

    async def _parallel(self, items: list[Device], work: Callable[[Device], Any]) -> None:
        queue: asyncio.Queue[Device] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                await work(queue.get_nowait())

        n = min(len(items), self.cfg.concurrency * len(self.cfg.servers))
        await asyncio.gather(*(worker() for _ in range(n)))

    async def enroll(self) -> int:
        """Enroll every device not enrolled yet; returns how many are enrolled in all."""
        self._open()
        token = self.cfg.enroll_token
        todo = [d for d in self.all if not d.auth]
        t0 = time.perf_counter()

        async def one(dev: Device) -> None:
            for _ in range(3):
                ans = await self._call(
                    "enroll", dev, "/device/v1/enroll", JSON, dev.enroll_body(token)
                )
                if ans is not None and ans.status == 201:
                    cred = json.loads(ans.body)["credential"]
                    dev.auth = f"Authorization: Bearer {cred}\r\n"
                    return
                if ans is not None and ans.status < 500:
                    return  # refused (token, scope, pending): retrying will not help

        try:
            await self._parallel(todo, one)
        finally:
            self.close()  # connections belong to this event loop; a session opens its own
        self.stats.enroll_seconds += time.perf_counter() - t0
        self.devices = [d for d in self.all if d.auth]
        return len(self.devices)

    # one session ----------------------------------------------------------------------------
    async def simulate(self, duration: float | None = None) -> dict[str, Any]:
        """Run the enrolled fleet for ``duration`` seconds (the config's by default); returns
        the report of this session."""
        self._open()
        cfg = self.cfg
        enroll_stats = self.stats
        self.stats = Stats(enroll_seconds=enroll_stats.enroll_seconds)
        for kind in ("enroll",):
            if kind in enroll_stats.status:
                self.stats.status[kind] = enroll_stats.status[kind]
                self.stats.latency[kind] = enroll_stats.latency[kind]
        self.stats.errors.update(
            {k: v for k, v in enroll_stats.errors.items() if k.startswith("enroll")}
        )
        self._heap, self._stopping = [], False
        self._t0 = now = time.monotonic()
        poll = cfg.scaled(cfg.poll)
        for dev in self.devices:
            dev.telemetry_scheduled = False
            if dev.install is None:
                self._at(now + self.rng.uniform(0, poll), POLL, dev)
            else:  # an install the last session left mid-way goes on
                self._at(now, PHASE, dev)
            if dev.active is not None:
                self._schedule_telemetry(dev, now)
        queue: asyncio.Queue[tuple[float, int, Device]] = asyncio.Queue()
        workers = [
            asyncio.create_task(self._worker(queue))
            for _ in range(cfg.concurrency * len(cfg.servers))
        ]
        end = now + (duration if duration is not None else cfg.duration)
        try:
            await self._dispatch(queue, end)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self.close()
        self.stats.run_seconds = time.monotonic() - self._t0
        self._sample(time.monotonic())
        report = self.stats.summary()
        report.update(self._fleet_facts())
        return report

    def stop(self) -> None:
        """End the current session at the next scheduling step."""
        self._stopping = True

    async def _dispatch(self, queue: asyncio.Queue[tuple[float, int, Device]], end: float) -> None:
        next_sample = self._t0
        heap = self._heap
        while not self._stopping:
            now = time.monotonic()
            if now >= next_sample:
                self._sample(now)
                next_sample = now + self.cfg.sample_seconds
                if self.cfg.until_converged and self.stats.converged_at is not None:
                    break
            if now >= end:
                break
            while heap and heap[0][0] <= now:
                due, _, kind, dev = heapq.heappop(heap)
                queue.put_nowait((due, kind, dev))
            wake = min(end, next_sample, heap[0][0] if heap else end)
            await asyncio.sleep(max(0.0, min(wake - time.monotonic(), 0.05)))

    async def _worker(self, queue: asyncio.Queue[tuple[float, int, Device]]) -> None:
        while True:
            due, kind, dev = await queue.get()
            try:
                if kind == POLL:
                    await self._poll(dev, due)
                elif kind == PHASE:
                    await self._phase(dev)
                else:
                    await self._telemetry(dev)
            except Exception as exc:  # a simulator bug must not silently stop a worker
                self.stats.failure("simulator", type(exc).__name__)

    def _at(self, when: float, kind: int, dev: Device) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, dev))

    def _jittered(self, seconds: float) -> float:
        j = self.cfg.jitter
        return seconds * self.rng.uniform(1 - j, 1 + j)

    # calls ----------------------------------------------------------------------------------
    async def _call(
        self, kind: str, dev: Device, path: str, headers: str, body: bytes
    ) -> Answer | None:
        try:
            ans = await self.pools[dev.server].request("POST", path, dev.auth + headers, body)
        except HttpFailure as exc:
            self.stats.failure(kind, exc.kind)
            return None
        self.stats.call(kind, ans.seconds, ans.status)  # not counting the wait for a connection
        return ans

    async def _poll(self, dev: Device, due: float) -> None:
        cfg, now = self.cfg, time.monotonic()
        poll = cfg.scaled(cfg.poll)
        if dev.install is not None:
            return  # the agent does not poll while it installs; it polls again afterwards
        if cfg.offline_rate and self.rng.random() < cfg.offline_rate:
            dev.offline_until = now + poll * self.rng.uniform(*cfg.offline_polls)
            self.stats.events["went_offline"] += 1
            self._at(dev.offline_until, POLL, dev)
            return
        if dev.offline_until:
            dev.offline_until = 0.0
            self.stats.events["came_back"] += 1
        self.stats.lag.append(now - due)
        body, sent = dev.body()
        headers = JSON + (f"If-None-Match: {dev.etag}\r\n" if dev.etag else "")
        ans = await self._call("checkin", dev, "/device/v1/checkin", headers, body)
        if ans is None or ans.status not in (200, 304):
            dev.failures += 1  # exponential backoff with full jitter, capped at one poll
            self._at(
                time.monotonic() + self.rng.uniform(0, min(poll, 0.5 * 2**dev.failures)), POLL, dev
            )
            return
        dev.failures = 0
        dev.delivered(sent)
        dev.etag = ans.headers.get("etag") or dev.etag
        if ans.status == 200:
            self._desired(dev, json.loads(ans.body))
        if dev.install is None:
            self._at(time.monotonic() + self._jittered(poll), POLL, dev)

    def _desired(self, dev: Device, doc: dict[str, Any]) -> None:
        policy = doc.get("telemetry") or {}
        dev.telemetry_on = bool(policy.get("enabled", True))
        dev.window_seconds = float(policy.get("window_seconds", 900.0))
        model = doc.get("model")
        if model is None:
            return
        revert = bool(model.get("revert"))
        dev.want = str(model["version"])
        if not revert:
            self.stats.told.setdefault(dev.device_id, set()).add(str(model["version"]))
        key = (model["manifest_digest"], model.get("rollout_id"), revert)
        if dev.tried == key:
            return  # like the agent: a failed apply is retried only when the target changes
        dev.tried = key
        rollout_id = model.get("rollout_id")
        if dev.active is not None and dev.active["digest"] == model["manifest_digest"]:
            dev.relabel(model)
            if rollout_id:
                state = S.ROLLED_BACK if revert else S.ACTIVE
                self._report(dev, model, state, detail="already running it")
            return
        phases = [S.HEALTH_CHECKING] if revert else list(PHASES)
        rate = (
            0.0 if revert else self.cfg.fail_versions.get(model["version"], self.cfg.failure_rate)
        )
        fail_at = self.rng.choice(phases) if rate and self.rng.random() < rate else None
        dev.install = Install(model, phases, fail_at)
        self.stats.events["installs_started"] += 1
        self._at(time.monotonic(), PHASE, dev)

    async def _phase(self, dev: Device) -> None:
        inst = dev.install
        if inst is None:
            return
        model = inst.model
        if inst.failing or inst.step == len(inst.phases):
            if inst.failing:
                stage = inst.fail_at
                self.stats.events["installs_failed"] += 1
                final = S.FAILED
            else:
                dev.switch_to(model)
                stage = None
                final = S.ROLLED_BACK if model.get("revert") else S.ACTIVE
                self.stats.events["reverted" if model.get("revert") else "installs_succeeded"] += 1
                self._schedule_telemetry(dev, time.monotonic())
            dev.install = None
            await self._post_report(dev, self._report(dev, model, final, stage=stage))
            self._at(time.monotonic() + self._jittered(self.cfg.scaled(self.cfg.poll)), POLL, dev)
            return
        state = inst.phases[inst.step]
        inst.step += 1
        inst.failing = state == inst.fail_at
        await self._post_report(dev, self._report(dev, model, state))
        if state == S.DOWNLOADING and self.cfg.fetch and not inst.failing:
            await self._fetch(dev, model)
        wait = self.cfg.scaled(self.cfg.latencies.get(state.value, 1.0))
        self._at(time.monotonic() + self._jittered(wait), PHASE, dev)

    def _report(
        self,
        dev: Device,
        model: dict[str, Any],
        state: S,
        *,
        stage: S | None = None,
        detail: str = "simulated",
    ) -> ActionStatus:
        status = ActionStatus(
            rollout_id=model.get("rollout_id"),
            version=model["version"],
            state=state,
            stage=stage,
            detail=detail if stage is None else f"simulated failure at {stage.value}",
        )
        dev.queue(status)
        return status

    async def _post_report(self, dev: Device, status: ActionStatus) -> None:
        """Post now when it names a rollout (as the agent does); else the check-in carries it."""
        if status.rollout_id is None:
            return
        body = ActionReport(actions=[status]).model_dump_json().encode()
        ans = await self._call("actions", dev, "/device/v1/actions", JSON, body)
        if ans is not None and ans.status == 204:
            dev.delivered([status])

    async def _fetch(self, dev: Device, model: dict[str, Any]) -> None:
        """Pull the variant's manifest and layers from the server's registry, checking digests."""
        repo, digest = model["repository"], model["manifest_digest"]
        pool = self.pools[dev.server]
        accept = f"Accept: {OCI_ACCEPT}\r\n"
        try:
            ans = await pool.request("GET", f"/v2/{repo}/manifests/{digest}", dev.auth + accept)
            blobs = [layer["digest"] for layer in json.loads(ans.body).get("layers", [])]
            for blob in blobs:
                got = await pool.request("GET", f"/v2/{repo}/blobs/{blob}", dev.auth)
                if "sha256:" + hashlib.sha256(got.body).hexdigest() != blob:
                    self.stats.failure("fetch", "digest_mismatch")
            self.stats.events["fetched_bytes"] += len(ans.body)
        except (HttpFailure, ValueError, KeyError) as exc:
            self.stats.failure("fetch", type(exc).__name__)

    # telemetry ------------------------------------------------------------------------------
    def _schedule_telemetry(self, dev: Device, now: float) -> None:
        if self.cfg.telemetry and not dev.telemetry_scheduled:
            dev.telemetry_scheduled = True
            window = self._window(dev)
            self._at(now + self.rng.uniform(0, window), TELEMETRY, dev)

    def _window(self, dev: Device) -> float:
        """Seconds per telemetry window: the policy's (or the override), scaled, at least 1 s."""
        return max(1.0, self.cfg.scaled(self.cfg.telemetry_seconds or dev.window_seconds))

    async def _telemetry(self, dev: Device) -> None:
        now = time.monotonic()
        window = self._window(dev)
        self._at(now + window, TELEMETRY, dev)
        if dev.active is None or not dev.telemetry_on or dev.offline_until > now:
            return
        wall = time.time()
        body = gzip.compress(window_batch(self.rng, dev.active or {}, wall - window, wall), mtime=0)
        headers = JSON + "Content-Encoding: gzip\r\n"
        await self._call("telemetry", dev, "/device/v1/telemetry", headers, body)

    # what the fleet looks like ----------------------------------------------------------------
    def _sample(self, now: float) -> None:
        versions: Counter[str] = Counter()
        installing = offline = 0
        converged, targeted = True, 0
        for dev in self.devices:
            versions[dev.version or "none"] += 1
            installing += dev.install is not None
            offline += dev.offline_until > now
            want = self.cfg.converge_version or dev.want
            if want is not None:
                targeted += 1
                if dev.version != want or dev.install is not None:
                    converged = False
        elapsed = round(now - self._t0, 2)
        if converged and targeted and self.stats.converged_at is None:
            self.stats.converged_at = elapsed
        snap = {
            "t": elapsed,
            "versions": dict(sorted(versions.items())),
            "installing": installing,
            "offline": offline,
        }
        self.stats.timeline.append(snap)
        if self.on_sample is not None:
            checkin = self.stats.latency.get("checkin", [])
            self.on_sample(
                snap
                | {
                    "checkins": len(checkin),
                    "checkins_per_s": round(len(checkin) / max(elapsed, 1e-9), 1),
                    "p99_ms": None
                    if not checkin
                    else round((percentile(checkin[-5000:], 0.99) or 0) * 1000, 1),
                    "errors": sum(self.stats.errors.values()),
                    "converged_at": self.stats.converged_at,
                }
            )

    def _fleet_facts(self) -> dict[str, Any]:
        versions = Counter(dev.version or "none" for dev in self.devices)
        return {
            "devices": len(self.all),
            "enrolled": len(self.devices),
            "servers": len(self.cfg.servers),
            "accelerate": self.cfg.accelerate,
            "poll_seconds": self.cfg.poll,
            "offered_checkins_per_s": round(len(self.devices) / self.cfg.scaled(self.cfg.poll), 1),
            "final_versions": dict(sorted(versions.items())),
            "converge_version": self.cfg.converge_version,
        }
