"""Variant discovery: which folders hold deployable variants (GGUF, ONNX GenAI) with a card.

Lives in model/ because evaluate/, bundle/ and the CLI all need it and none of them should
depend on another stage to find variants on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slmops.core.errors import ConfigError
from slmops.model.card import LineageCard, read_card
from slmops.model.handle import ModelFormat

DEPLOYABLE = {ModelFormat.GGUF.value: "llama.cpp", ModelFormat.ONNX.value: "onnxruntime-genai"}


@dataclass
class FoundVariant:
    name: str
    path: Path
    card: LineageCard


def discover_variants(variants_dir: Path, only: list[str] | None = None) -> list[FoundVariant]:
    """Deployable variants (GGUF, ONNX GenAI) with lineage cards, in name order."""
    if not variants_dir.is_dir():
        raise ConfigError(
            "variants folder not found",
            where=variants_dir,
            hint="pass the --out folder of `slmops optimize`",
        )
    candidates = (
        [variants_dir]
        if read_card(variants_dir)
        else sorted(p for p in variants_dir.iterdir() if p.is_dir())
    )
    found = []
    for p in candidates:
        if p.name.startswith("."):
            continue
        card = read_card(p)
        if card is None or card.format not in DEPLOYABLE:
            continue
        if only and card.variant not in only and p.name not in only:
            continue
        found.append(FoundVariant(card.variant or p.name, p, card))
    if not found:
        raise ConfigError(
            "no deployable variants (GGUF or ONNX GenAI folders with a slmops card) found",
            where=variants_dir,
            hint="run `slmops optimize MODEL --out DIR` first and pass DIR",
        )
    return found
