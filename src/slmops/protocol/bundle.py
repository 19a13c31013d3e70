"""What a device needs to know about a bundle's variants to pick one, without downloading any.

A `VariantDescriptor` is the config blob of each variant manifest in a bundle: the agent matches
it against its hardware (runtime available, RAM it may give the model, disk) and the control
plane resolves variants per device from it.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from slmops.core.config import StrictModel
from slmops.protocol.digest import Digest
from slmops.protocol.telemetry import BOUNDS

DESCRIPTOR_SCHEMA = "slmops.variant-descriptor/v1"
BUNDLE_SCHEMA = "slmops.bundle/v1"


class QualityBaseline(StrictModel):
    """What the field's quality proxies looked like in evaluation, to detect drift against.

    The same two histograms a device reports in its telemetry windows (``BOUNDS["logprob"]``
    per generated token, ``BOUNDS["output_tokens"]`` per response), from generating on
    ``prompts`` fixed prompts of the evaluation text, up to ``max_tokens`` each, at
    ``temperature`` (0: greedy). Log-probabilities and entropies are under the raw model
    distribution (softmax of the logits), as devices report them.
    """

    logprob: list[float] = Field(description="per-token log-probability counts over BOUNDS")
    output_tokens: list[float] = Field(description="per-response token count over BOUNDS")
    prompts: int = Field(ge=0)
    max_tokens: int = Field(ge=1)
    temperature: float = Field(0.0, ge=0)
    tokens: int = Field(0, ge=0, description="generated tokens behind the histograms")
    logprob_mean: float | None = None
    entropy_mean: float | None = Field(None, description="mean next-token entropy (nats)")

    @model_validator(mode="after")
    def _buckets(self) -> Self:
        for name in ("logprob", "output_tokens"):
            got, want = len(getattr(self, name)), len(BOUNDS[name]) + 1
            if got != want:
                raise ValueError(f"baseline histogram {name!r} has {got} buckets, expected {want}")
        return self


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
    card_digest: Digest | None = None
    baseline: QualityBaseline | None = Field(
        None, description="evaluation baseline of the field's quality proxies (drift detection)"
    )
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
