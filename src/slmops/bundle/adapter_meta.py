"""What an adapter artifact says about itself: the base it fits, to the variant, digest and shape.

The `AdapterDescriptor` is the config blob of an adapter manifest. The control plane assigns
an adapter only to devices running one of its `variants`; the agent installs it only over the
base bundle named by `base.bundle_digest` (which is also the artifact's OCI `subject`) and a
variant whose manifest digest is listed, and only if the running GGUF's tensors have the
`shapes` listed. Three independent checks, so an adapter meant for another base never reaches
llama.cpp (which would refuse it at load time, or on some versions abort the process).

Agent-safe: pydantic and slmops.core/protocol only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slmops.core.config import StrictModel
from slmops.protocol.digest import Digest

ADAPTER_SCHEMA = "slmops.adapter-descriptor/v1"
ADAPTER_FILE = "adapter.gguf"  # the layer title of the GGUF LoRA
ANN_ADAPTER_BASE = "io.slmops.adapter.base"  # name:version of the base, on the adapter index


class AdapterBase(StrictModel):
    """The base bundle version the adapter was made for (its index digest is the subject)."""

    name: str
    version: str
    bundle_digest: Digest


class AdapterVariant(StrictModel):
    """One GGUF variant of the base the adapter fits (same tensor names and shapes)."""

    name: str
    manifest_digest: Digest
    gguf_digest: Digest = Field(description="sha256 of the variant's GGUF weights layer")
    gguf_bytes: int = Field(ge=0)


class AdapterDescriptor(StrictModel):
    schema_: str = Field(ADAPTER_SCHEMA, alias="schema")
    name: str
    version: str
    format: Literal["gguf-lora"] = "gguf-lora"
    runtime: Literal["llama.cpp"] = "llama.cpp"
    base: AdapterBase
    variants: list[AdapterVariant] = Field(min_length=1)
    architecture: str
    rank: int = Field(gt=0)
    alpha: float | None = None
    shapes: dict[str, list[int]] = Field(
        min_length=1, description="base tensor name -> its dims (ggml order) the adapter fits"
    )
    disk_bytes: int = Field(ge=0, description="size of adapter.gguf")
    base_model_digest: str | None = Field(
        None, description="digest of the Hugging Face base the adapter was trained on"
    )
    evaluation: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    model_config = StrictModel.model_config | {"populate_by_name": True}

    def variant(self, manifest_digest: str) -> AdapterVariant | None:
        return next((v for v in self.variants if v.manifest_digest == manifest_digest), None)
