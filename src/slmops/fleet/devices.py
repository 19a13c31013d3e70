"""Simulated devices: hardware classes, and the state one device keeps between calls.

A device is a slotted object, not a task: a simulated fleet of 100k devices is 100k of these
plus one heap of due events, which fits in memory and schedules in O(log n) per event. The
check-in body is built with the protocol's own models (so the wire format cannot drift from
the agent's) and cached as bytes until the device's models or pending reports change.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from slmops import __version__
from slmops.protocol.device import (
    ActionStatus,
    ActiveModel,
    CheckIn,
    EnrollRequest,
    Inventory,
)
from slmops.protocol.fleet import DeviceActionState
from slmops.protocol.telemetry import Histogram, TelemetryBatch, WindowAggregate, bucket_counts

GIB = 1 << 30


@dataclass(frozen=True)
class HardwareClass:
    """A kind of box in the simulated fleet; ``profile`` and the ``hw`` label let blueprints
    select it, and the RAM and runtimes decide which variant the server resolves for it."""

    name: str
    arch: str
    cores: int
    ram_gib: int
    model_ram_gib: int
    runtimes: tuple[str, ...]
    weight: int = 1

    def inventory(self, labels: dict[str, str]) -> Inventory:
        return Inventory.model_validate(
            {
                "arch": self.arch,
                "cores": self.cores,
                "ram_bytes": self.ram_gib * GIB,
                "free_disk_bytes": 32 * GIB,
                "runtimes": list(self.runtimes),
                "agent_version": f"{__version__}+sim",
                "model_ram_bytes": self.model_ram_gib * GIB,
                "model_cores": max(1, self.cores // 2),
                "profile": self.name,
                "labels": labels,
            }
        )


HARDWARE: tuple[HardwareClass, ...] = (
    HardwareClass("pi", "aarch64", 4, 8, 2, ("gguf",), weight=4),
    HardwareClass("gateway", "x86_64", 8, 16, 4, ("gguf", "onnx-genai"), weight=3),
    HardwareClass("jetson", "aarch64", 6, 8, 3, ("gguf", "onnx-genai"), weight=2),
    HardwareClass("laptop", "x86_64", 8, 32, 8, ("gguf", "onnx-genai"), weight=1),
)


def hardware_for(index: int) -> HardwareClass:
    """Deterministic spread by weight: the same index always gets the same class."""
    total = sum(h.weight for h in HARDWARE)
    slot = (index * 7919) % total
    for hw in HARDWARE:
        if slot < hw.weight:
            return hw
        slot -= hw.weight
    return HARDWARE[0]  # pragma: no cover - the weights cover every slot


@dataclass
class Install:
    """An install in progress: the desired model, the phases left, where it will fail."""

    model: dict[str, Any]
    phases: list[DeviceActionState]
    fail_at: DeviceActionState | None
    step: int = 0
    failing: bool = False


@dataclass(eq=False)
class Device:
    index: int
    device_id: str
    server: int
    hw: HardwareClass
    inventory: Inventory
    auth: str = ""
    etag: str | None = None
    active: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    pending: dict[tuple[str | None, str], ActionStatus] = field(default_factory=dict)
    tried: tuple[Any, ...] | None = None
    want: str | None = None  # the version the server last told it to run
    install: Install | None = None
    offline_until: float = 0.0
    failures: int = 0
    window_seconds: float = 900.0
    telemetry_on: bool = True
    telemetry_scheduled: bool = False
    _body: bytes | None = None

    def enroll_body(self, token: str) -> bytes:
        req = EnrollRequest(
            enrollment_token=token, device_id=self.device_id, inventory=self.inventory
        )
        return req.model_dump_json(by_alias=True).encode()

    def body(self) -> tuple[bytes, list[ActionStatus]]:
        """The check-in body (cached) and the pending reports it carries."""
        sent = list(self.pending.values())[-64:]
        if self._body is None:
            doc = CheckIn(
                inventory=self.inventory,
                active=ActiveModel.model_validate(self.active) if self.active else None,
                previous=ActiveModel.model_validate(self.previous) if self.previous else None,
                actions=sent,
            )
            self._body = doc.model_dump_json(by_alias=True).encode()
        return self._body, sent

    def delivered(self, sent: list[ActionStatus]) -> None:
        """Forget reports the server has acknowledged (unless replaced meanwhile)."""
        for st in sent:
            key = (st.rollout_id, st.version)
            if self.pending.get(key) is st:
                del self.pending[key]
                self._body = None

    def queue(self, status: ActionStatus) -> None:
        self.pending[(status.rollout_id, status.version)] = status
        self._body = None

    def switch_to(self, model: dict[str, Any]) -> None:
        """Make ``model`` active and keep the one it replaces (A/B slots)."""
        new = {
            "name": model["name"],
            "version": model["version"],
            "variant": model["variant"],
            "digest": model["manifest_digest"],
        }
        # either way the model it ran becomes the kept one (a revert swaps the two slots)
        self.previous, self.active = self.active, new
        self._body = None

    def relabel(self, model: dict[str, Any]) -> None:
        if self.active is not None and self.active["version"] != model["version"]:
            self.active = {**self.active, "name": model["name"], "version": model["version"]}
            self._body = None

    @property
    def version(self) -> str | None:
        return None if self.active is None else str(self.active["version"])


def window_batch(rng: random.Random, active: dict[str, Any], start: float, end: float) -> bytes:
    """One telemetry batch of one window of aggregates (counts, histograms, means): never any
    text, as the agent sends (protocol/telemetry.py); JSON, to be gzipped by the caller."""
    n = rng.randint(1, 40)
    latency = [rng.uniform(200, 3000) for _ in range(n)]
    window = WindowAggregate(
        start=round(start, 3),
        end=round(end, 3),
        model=active.get("name"),
        version=active.get("version"),
        variant=active.get("variant"),
        requests=float(n),
        prompt_tokens=float(n * 120),
        output_tokens=float(n * 80),
        histograms={
            "latency_ms": Histogram(
                counts=bucket_counts("latency_ms", latency), sum=sum(latency), count=float(n)
            )
        },
        logprob_mean=-rng.uniform(0.3, 1.5),
        quality_tokens=float(n * 80),
        peak_rss_bytes=600 << 20,
        health_ok=1.0,
    )
    batch = TelemetryBatch(batch_id=uuid.uuid4().hex, windows=[window])
    return batch.model_dump_json(by_alias=True).encode()
