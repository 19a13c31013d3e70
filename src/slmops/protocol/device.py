"""The device API's wire schemas: enrollment, check-in (inventory + status), desired state.

Versioned by `schema`; unknown keys are refused in both directions so a mismatch between an
agent and a control plane is an error, not silent data loss. Shared by the agent (client) and
the server (API), and by nothing heavier than pydantic.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from slmops.core.config import StrictModel
from slmops.protocol.digest import Digest
from slmops.protocol.fleet import DeviceActionState
from slmops.protocol.registry_url import RegistryUrl
from slmops.protocol.telemetry import TelemetryPolicy

PROTOCOL_VERSION = "slmops.device/v1"


MAX_LABELS = 64
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=63)]
LabelValue = Annotated[str, StringConstraints(max_length=128)]
Count = Annotated[int, Field(strict=True)]
"""Strict ints: JSON ``false`` or ``1.5`` is refused where a byte or core count is due."""


class Inventory(StrictModel):
    """Hardware facts the agent reports, and what it may give the model (set in its config).

    Every field is bounded (labels: at most ``MAX_LABELS``, keys 63 and values 128 characters)
    because it is stored on the device row and shown to operators."""

    arch: str = Field(max_length=64)
    cores: Count = Field(gt=0, le=1 << 16)
    ram_bytes: Count = Field(gt=0, le=1 << 60)
    free_disk_bytes: Count = Field(ge=0, le=1 << 62)
    runtimes: list[Literal["gguf", "onnx-genai"]] = Field(default_factory=list, max_length=8)
    agent_version: str = Field(max_length=64)
    model_ram_bytes: Count = Field(
        gt=0, le=1 << 60, description="RAM the device leaves for the model"
    )
    model_cores: Count = Field(
        gt=0, le=1 << 16, description="cores the device leaves for the model"
    )
    profile: str | None = Field(
        None, max_length=128, description="hardware class (device profile name) if known"
    )
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS)


class EnrollRequest(StrictModel):
    schema_: str = Field(PROTOCOL_VERSION, alias="schema")
    enrollment_token: str | None = Field(
        None, min_length=8, max_length=512, description="needed unless `credential` proves the id"
    )
    device_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    inventory: Inventory
    credential: str | None = Field(
        None,
        max_length=512,
        description="the device's current (or pending) credential, when it has one: re-enrolling "
        "an existing id without it waits for an operator's approval",
    )
    model_config = StrictModel.model_config | {"populate_by_name": True}


class EnrollResponse(StrictModel):
    device_id: str
    credential: str = Field(description="per-device secret; the server stores only its hash")
    status: Literal["enrolled", "pending"] = Field(
        "enrolled", description="pending: works only once an operator approves `request_id`"
    )
    request_id: str | None = None
    detail: str | None = None


class ActiveAdapter(StrictModel):
    """The LoRA adapter loaded on top of the active model (agent/adapters.py)."""

    name: str
    version: str
    digest: Digest = Field(description="adapter artifact (index) digest")


class ActiveModel(StrictModel):
    name: str = Field(max_length=255)
    # the width of the server's version columns (rollouts.target_version, rollout_devices.
    # from_version): a longer claim would fail every rollout of the device's blueprint
    version: str = Field(max_length=64)
    variant: str
    digest: Digest = Field(description="variant manifest digest")
    adapter: ActiveAdapter | None = Field(None, description="the adapter loaded on top, if any")


class ActionStatus(StrictModel):
    rollout_id: str | None = None
    version: str
    state: DeviceActionState
    stage: DeviceActionState | None = Field(None, description="where a failure happened")
    detail: str = Field("", max_length=2000)


class ActionReport(StrictModel):
    """Install progress posted between check-ins (POST /device/v1/actions)."""

    actions: list[ActionStatus] = Field(min_length=1, max_length=64)


class CheckIn(StrictModel):
    schema_: str = Field(PROTOCOL_VERSION, alias="schema")
    inventory: Inventory
    active: ActiveModel | None = None
    previous: ActiveModel | None = None
    actions: list[ActionStatus] = Field(default_factory=list, max_length=64)
    model_config = StrictModel.model_config | {"populate_by_name": True}


class GenerationDefaults(StrictModel):
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: Count = Field(256, gt=0, le=8192)
    system_prompt: str | None = None
    api_key: str | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="when set, the agent's local API requires Authorization: Bearer <key>",
    )


class DesiredAdapter(StrictModel):
    """A LoRA adapter artifact to load on top of the desired model (blueprint `adapters:`)."""

    name: str
    version: str
    digest: Digest = Field(description="adapter artifact (index) digest: what is signed")
    manifest_digest: Digest
    layer_digest: Digest = Field(description="the adapter.gguf layer")
    size: int = Field(ge=0, description="bytes of the adapter.gguf layer")
    repository: str = Field(description="OCI repository on the control plane's registry")


class DesiredModel(StrictModel):
    """One resolved variant of one bundle version: what the device should run."""

    name: str
    version: str
    variant: str
    bundle_digest: Digest
    manifest_digest: Digest
    repository: str = Field(description="OCI repository on the control plane's registry")
    rollout_id: str | None = None
    revert: bool = Field(False, description="true when this is a rollback to the kept version")
    adapter: DesiredAdapter | None = Field(None, description="None: run the model alone")
    registry: RegistryUrl | None = Field(
        None,
        description="external OCI registry holding the bundle (blueprint `registry:`); None: "
        "the control plane's own. The device credential is never sent there",
        exclude_if=lambda v: v is None,  # absent when unset: older agents and ETags unchanged
    )


class DesiredState(StrictModel):
    schema_: str = Field(PROTOCOL_VERSION, alias="schema")
    device_id: str
    model: DesiredModel | None = Field(None, description="None: keep what runs")
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    unplaceable: str | None = Field(None, description="why no variant fits this device, if so")
    adapter_unplaceable: str | None = Field(
        None, description="why the adapter the blueprint assigns is not assigned, if so"
    )
    poll_seconds: float = Field(60.0, gt=0)
    telemetry: TelemetryPolicy = Field(default_factory=TelemetryPolicy)
    model_config = StrictModel.model_config | {"populate_by_name": True}
