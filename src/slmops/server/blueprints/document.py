"""Blueprints: declarative desired state, applied like `kubectl apply`.

    apiVersion: slmops/v1
    kind: Blueprint
    metadata: {name: store-assistant}
    spec:
      selector: {fleet: stores}              # devices with all these labels
      model: {name: assistant, channel: stable}   # or version: 1.2.0
      generation: {temperature: 0.2, system_prompt: "You help store staff."}   # fleet level
      groups:                                # group level: later groups win over earlier ones
        - selector: {region: eu}
          generation: {system_prompt: "Du hilfst dem Filialpersonal."}
      devices:                               # device level: the last word
        kiosk-17: {max_tokens: 64}
      rollout: {waves: [{count: 1}, {percent: 50}, {percent: 100}]}
      adapters:                              # LoRA adapters by label (most specific wins)
        - {selector: {site: store-1}, adapter: store-1-menu, version: 1.0.0}
      registry: https://registry.example.com   # optional: devices pull the bytes from here

Precedence for generation settings: built-in defaults < spec.generation (fleet) < matching
groups in order < devices[device_id]. Unknown keys are refused with the file and key named.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from slmops.core.config import StrictModel
from slmops.protocol.device import GenerationDefaults
from slmops.protocol.document import Document
from slmops.protocol.registry_url import RegistryUrl
from slmops.protocol.telemetry import TelemetryPolicy
from slmops.server.rollouts.machine.policy import RolloutPolicy


class GenerationOverrides(StrictModel):
    """Partial generation settings: only the keys given override the level below."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0, le=8192, strict=True)
    system_prompt: str | None = Field(None, max_length=8000)
    api_key: str | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="Bearer key the agent's local OpenAI API requires (none: no key)",
    )


class ModelRef(StrictModel):
    name: str
    channel: str | None = None
    version: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelRef:
        if (self.channel is None) == (self.version is None):
            raise ValueError("give exactly one of `channel` or `version`")
        return self


class GroupOverride(StrictModel):
    selector: dict[str, str] = Field(min_length=1)
    generation: GenerationOverrides


class AdapterAssignment(StrictModel):
    """A LoRA adapter for the devices matching `selector` (within the blueprint's own)."""

    selector: dict[str, str] = Field(default_factory=dict, description="empty: every device")
    adapter: str = Field(min_length=1, max_length=255, description="adapter artifact name")
    version: str = Field(min_length=1, max_length=128)


class BlueprintSpec(StrictModel):
    selector: dict[str, str] = Field(default_factory=dict, description="empty: every device")
    model: ModelRef
    generation: GenerationOverrides = Field(default_factory=GenerationOverrides)
    groups: list[GroupOverride] = Field(default_factory=list)
    devices: dict[str, GenerationOverrides] = Field(default_factory=dict)
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)
    telemetry: TelemetryPolicy = Field(default_factory=TelemetryPolicy)
    adapters: list[AdapterAssignment] = Field(
        default_factory=list, description="per-site LoRA adapters; the most specific selector wins"
    )
    registry: RegistryUrl | None = Field(
        None,
        description="external OCI registry devices pull the bundle from (it must hold the "
        "same bundle, signatures included); None: the control plane's own registry",
        exclude_if=lambda v: v is None,  # stored specs without it stay unchanged on re-apply
    )


class Blueprint(Document):
    kind: Literal["Blueprint"]
    spec: BlueprintSpec


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def assigned_adapter(
    bp: Blueprint, labels: dict[str, str], assignments: Sequence[AdapterAssignment] | None = None
) -> AdapterAssignment | None:
    """The matching assignment with the most selector keys; ties to the smallest adapter name
    (as blueprint precedence: the answer never depends on the order in the file).
    ``assignments``: a release's list (a rollout's or the stable one) instead of the spec's."""
    listed = bp.spec.adapters if assignments is None else assignments
    fitting = [a for a in listed if matches(a.selector, labels)]
    return min(fitting, key=lambda a: (-len(a.selector), a.adapter, a.version), default=None)


def adapter_release(assignments: Sequence[AdapterAssignment]) -> list[dict[str, Any]]:
    """Adapter assignments as stored with a rollout or as the stable release: JSON, in one
    canonical order, so two releases compare equal exactly when they assign the same adapters."""
    docs = [a.model_dump(mode="json") for a in assignments]
    return sorted(docs, key=lambda d: json.dumps(d, sort_keys=True))


def parse_release(docs: Sequence[dict[str, Any]] | None) -> list[AdapterAssignment]:
    """A stored release back as assignments (None, as on a blueprint before any release: [])."""
    return [AdapterAssignment.model_validate(d) for d in docs or []]


def effective_generation(
    bp: Blueprint, device_id: str, labels: dict[str, str]
) -> GenerationDefaults:
    """Merge defaults < fleet < matching groups (in order) < device."""
    merged = GenerationDefaults().model_dump()
    layers = [bp.spec.generation]
    layers += [g.generation for g in bp.spec.groups if matches(g.selector, labels)]
    if device_id in bp.spec.devices:
        layers.append(bp.spec.devices[device_id])
    for layer in layers:
        merged.update({k: v for k, v in layer.model_dump().items() if v is not None})
    return GenerationDefaults.model_validate(merged)
