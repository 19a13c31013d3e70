"""What a device needs to know about a bundle's variants to pick one, without downloading any.

A `VariantDescriptor` is the config blob of each variant manifest in a bundle: the agent matches
it against its hardware (runtime available, RAM it may give the model, disk) and the control
plane resolves variants per device from it.
"""

from __future__ import annotations

from pydantic import Field

from slmops.core.config import StrictModel

DESCRIPTOR_SCHEMA = "slmops.variant-descriptor/v1"
BUNDLE_SCHEMA = "slmops.bundle/v1"


class VariantDescriptor(StrictModel):
    schema_: str = Field(DESCRIPTOR_SCHEMA, alias="schema")
    name: str
    runtime: str = Field(description="runtime that loads it: llama.cpp or onnxruntime-genai")
    format: str = Field(description="gguf or onnx-genai")
    quantization: str | None = None
    pruning: list[str] = Field(default_factory=list)
    parameters: int | None = None
    disk_bytes: int = Field(ge=0)
    ram_bytes: int | None = Field(None, description="weights + KV cache at ram_context_tokens")
    ram_context_tokens: int | None = None
    peak_rss_bytes: int | None = Field(None, description="highest peak RSS measured in evaluation")
    kld_mean: float | None = Field(
        None, description="quality vs the original model (lower is better)"
    )
    selected_for: list[str] = Field(
        default_factory=list, description="device profiles it was chosen for"
    )
    fits: list[str] = Field(default_factory=list, description="device profiles it fits")
    card_digest: str | None = None
    model_config = StrictModel.model_config | {"populate_by_name": True}


class BundleInfo(StrictModel):
    """The bundle manifest's config: one model version."""

    schema_: str = Field(BUNDLE_SCHEMA, alias="schema")
    name: str
    version: str
    created_at: str
    origin_digest: str | None = None
    variants: list[str]
    selection: dict[str, str | None] = Field(default_factory=dict, description="profile -> variant")
    slmops_version: str
    model_config = StrictModel.model_config | {"populate_by_name": True}
