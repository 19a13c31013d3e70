"""Adjusted recipes for the feedback loop: the next variants to try for one device profile.

Field signals say which way to move from the variant a profile runs: the quality proxy fell
(drift, or a canary regressing on quality) → more precision; memory pressure rose → smaller. The
starting point is the running variant's own chain, read from its lineage card, so the new
candidates differ from it in exactly one respect:

- ``higher-precision``: the same chain at the next rungs up the precision ladder, and (if the
  chain prunes) the chain without its pruning steps;
- ``smaller``: the next rungs down, and (if the chain does not prune) a structurally pruned chain.

Ladders are ordered by bits per weight (llama.cpp's k-quants; ONNX GenAI's precisions). The
result is an ordinary recipe document, so it runs through the same engine, cache and evaluation
as a hand-written one.
"""

from __future__ import annotations

import re
from typing import Any

from slmops.core.errors import UserInputError
from slmops.model.card import LineageCard
from slmops.optimize.recipe import RecipeFile
from slmops.protocol.document import Direction

DIRECTIONS: tuple[Direction, ...] = ("higher-precision", "smaller")

GGUF_LADDER = ("Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16")
ONNX_LADDER = ("int4", "int8", "fp16", "fp32")
PRUNE_PASSES = ("prune-magnitude", "prune-nm", "prune-wanda", "prune-structured")
SMALLER_PRUNE: dict[str, Any] = {"target": "ffn", "ratio": 0.25}


def _prune_round_to(rung: str) -> int:
    """FFN width multiple for the pruned candidate: k-quants pack 256-weight super-blocks, the
    legacy types (Q4_0, Q8_0) and F16 32; a small model (FFN under ~340 channels) cannot keep a
    multiple of 256, so only the k-quant rungs ask for it."""
    return 256 if "_K" in rung else 32


Chain = list[tuple[str, dict[str, Any]]]


def chain_of(card: LineageCard) -> Chain:
    """The recipe chain that produced a variant, from its lineage card."""
    if not card.chain:
        raise UserInputError(
            "the lineage card records no passes: this is an original model, not a variant",
            where=card.variant or "lineage card",
        )
    return [(step.pass_name, dict(step.config)) for step in card.chain]


def _precision(chain: Chain) -> tuple[str, int, str] | None:
    """(ladder kind, step index, current rung) of the step that sets the weights' precision."""
    for i in range(len(chain) - 1, -1, -1):
        name, cfg = chain[i]
        if name == "quantize-gguf":
            return "gguf", i, str(cfg.get("type", "")).upper()
        if name == "export-gguf":
            return "gguf", i, str(cfg.get("outtype", "f16")).upper()
        if name == "export-onnx":
            return "onnx", i, str(cfg.get("precision", "int4")).lower()
    return None


def _with_rung(chain: Chain, kind: str, index: int, rung: str) -> Chain:
    out = [(n, dict(c)) for n, c in chain]
    name, cfg = out[index]
    if kind == "onnx":
        cfg["precision"] = rung
        return out
    if rung == "F16":  # F16 is the export itself: drop the quantize step
        if name == "quantize-gguf":
            del out[index]
        return out
    if name == "quantize-gguf":
        cfg["type"] = rung
    else:  # an export without quantize: add one
        out.insert(index + 1, ("quantize-gguf", {"type": rung}))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-")[:64]


def adjusted_recipe(
    card: LineageCard, direction: Direction, *, rungs: int = 2, prefix: str = "next"
) -> RecipeFile:
    """Candidate variants one step away from the variant ``card`` describes."""
    if direction not in DIRECTIONS:
        raise UserInputError(
            f"unknown direction {direction!r}", hint="use one of: " + ", ".join(DIRECTIONS)
        )
    chain = chain_of(card)
    found = _precision(chain)
    if found is None:
        raise UserInputError(
            "the variant's chain has no export or quantize step to adjust",
            where=card.variant or "lineage card",
        )
    kind, index, rung = found
    ladder = GGUF_LADDER if kind == "gguf" else ONNX_LADDER
    if rung not in ladder:
        raise UserInputError(
            f"precision {rung} is not on the {kind} ladder ({', '.join(ladder)})",
            where=card.variant or "lineage card",
        )
    pos = ladder.index(rung)
    steps = (
        ladder[pos + 1 : pos + 1 + rungs]
        if direction == "higher-precision"
        else (tuple(reversed(ladder[max(0, pos - rungs) : pos])))
    )
    variants: dict[str, Chain] = {}
    for r in steps:
        variants[_slug(f"{prefix}-{kind}-{r}")] = _with_rung(chain, kind, index, r)
    pruned = any(name in PRUNE_PASSES for name, _ in chain)
    if direction == "higher-precision" and pruned:
        unpruned = [(n, c) for n, c in chain if n not in PRUNE_PASSES]
        variants[_slug(f"{prefix}-unpruned-{kind}-{rung}")] = unpruned
    if direction == "smaller" and not pruned and kind == "gguf":
        variants[_slug(f"{prefix}-ffn25-{kind}-{rung}")] = [
            ("prune-structured", dict(SMALLER_PRUNE, round_to=_prune_round_to(rung))),
            *chain,
        ]
    if not variants:
        raise UserInputError(
            f"{card.variant or 'the variant'} is already at the "
            f"{'top' if direction == 'higher-precision' else 'bottom'} of the {kind} ladder "
            f"({rung}) and has nothing to {'unprune' if direction == 'higher-precision' else 'prune'}",
            hint="adjust the recipe by hand",
        )
    return RecipeFile(
        name=f"{prefix}-{direction}",
        description=f"{direction} candidates next to {card.variant or 'the running variant'} "
        f"({kind} {rung})",
        variants={name: [{n: c} for n, c in ch] for name, ch in variants.items()},
    )
