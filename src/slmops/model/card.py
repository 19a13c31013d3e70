"""The lineage card: how a model directory was made, step by step.

Every pass output carries `slmops-card.json`. The card of a chained output repeats the chain of
its parent plus its own step, so any variant can be traced back to the original weights without
looking anywhere else. Bundles, reports and the fleet read these cards later.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from slmops.core.atomic import write_json_atomic
from slmops.core.config import StrictModel, config_error_from_validation
from slmops.core.errors import ModelFormatError

CARD_FILE = "slmops-card.json"
CARD_SCHEMA = "slmops.card/v1"


# Kinds of the built-in passes, for cards written before StepRecord.kind was recorded.
_LEGACY_KINDS = {
    "export-gguf": "export",
    "export-onnx": "export",
    "quantize-gguf": "quantize",
    "prune-magnitude": "prune-unstructured",
    "prune-wanda": "prune-unstructured",
    "prune-nm": "prune-semi-structured",
    "prune-structured": "prune-structured",
}


class StepRecord(StrictModel):
    """One pass application: what went in, what ran, what came out, what it cost."""

    pass_name: str
    pass_version: int
    kind: str | None = Field(
        None,
        description="what the step did (export, quantize, prune-unstructured, "
        "prune-semi-structured, prune-structured, distill, import); recorded so later stages "
        "never need the pass registry to read a card",
    )
    config: dict[str, Any]
    input_digest: str
    output_digest: str
    input_bytes: int
    output_bytes: int
    wall_time_s: float
    peak_rss_bytes: int
    baseline_rss_bytes: int = Field(description="RSS after imports, before the pass ran")
    tool_versions: dict[str, str]
    started_at: str
    report: dict[str, Any] = Field(default_factory=dict, description="pass-specific facts")


class LineageCard(StrictModel):
    schema_: str = Field(default=CARD_SCHEMA, alias="schema")
    format: str
    digest: str = Field(description="tree digest of the directory, excluding this card")
    size_bytes: int
    origin_digest: str = Field(description="digest of the original model the chain started from")
    origin_path: str | None = None
    chain: list[StepRecord] = Field(default_factory=list)
    variant: str | None = None
    # Summaries that later stages read without walking the chain.
    sparsity: dict[str, Any] | None = None
    structure: dict[str, Any] | None = None
    quantization: str | None = None
    origin: dict[str, Any] | None = Field(
        None,
        description="for imported models (slmops import / model dequantize): the file the chain "
        "started from (name, sha256, format, quantization, architecture, per-tensor types)",
    )
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    model_config = StrictModel.model_config | {"populate_by_name": True}

    def kinds(self) -> list[str]:
        """Kinds of every step, in chain order (cards written before `kind` existed fall back
        to the built-in pass names)."""
        return [s.kind or _LEGACY_KINDS.get(s.pass_name, "unknown") for s in self.chain]

    def pruning_kinds(self) -> list[str]:
        return sorted({k for k in self.kinds() if k.startswith("prune")})

    def write(self, directory: Path) -> None:
        write_json_atomic(directory / CARD_FILE, self.model_dump(mode="json", by_alias=True))


def read_card(directory: Path) -> LineageCard | None:
    path = directory / CARD_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"unreadable lineage card: {exc}", where=path) from None
    try:
        return LineageCard.model_validate(data)
    except ValidationError as exc:
        raise config_error_from_validation(exc, source=str(path)) from None
