"""Recipes: named variants, each a chain of passes, validated before any work starts.

    name: edge-default
    variants:
      gguf-q4_k_m:
        - export-gguf: {outtype: f16}
        - quantize-gguf: {type: Q4_K_M}

A step is a one-key mapping (pass name -> options) or a bare pass name for defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from slmops.core.config import StrictModel
from slmops.core.errors import ConfigError
from slmops.model.handle import ModelFormat
from slmops.optimize.passes.base import Pass, build_pass

VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class RecipeFile(StrictModel):
    name: str = "recipe"
    description: str = ""
    variants: dict[str, list[str | dict[str, dict[str, Any] | None]]] = Field(min_length=1)

    @field_validator("variants")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not VARIANT_NAME.match(name):
                raise ValueError(
                    f"variant name {name!r} must be lowercase letters, digits, '.', '_' or '-' (max 64)"
                )
        return v


@dataclass
class Step:
    pass_: Pass[Any]
    where: str

    @property
    def name(self) -> str:
        return self.pass_.name

    @property
    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = self.pass_.config.model_dump(mode="json")
        return options


@dataclass
class Recipe:
    name: str
    description: str
    variants: dict[str, list[Step]]
    source: str

    def formats(self, variant: str) -> ModelFormat:
        return self.variants[variant][-1].pass_.output_format


def load_recipe(path: str | Path) -> Recipe:
    raw = RecipeFile.from_file(path)
    return compile_recipe(raw, source=str(path))


def compile_recipe(raw: RecipeFile, *, source: str = "<recipe>") -> Recipe:
    """Resolve pass names and options, and check that each chain's formats connect."""
    variants: dict[str, list[Step]] = {}
    for vname, steps in raw.variants.items():
        if not steps:
            raise ConfigError(f"variant '{vname}' has no passes", where=source)
        chain: list[Step] = []
        current = ModelFormat.HF
        for i, item in enumerate(steps):
            where = f"{source}: variants.{vname}[{i}]"
            options: dict[str, Any] | None
            if isinstance(item, str):
                pname, options = item, {}
            else:
                if len(item) != 1:
                    raise ConfigError(
                        f"a step must have exactly one pass name as its key, got {sorted(item)}",
                        where=where,
                        hint="write each step as `- pass-name: {option: value}`",
                    )
                ((pname, options),) = item.items()
            p = build_pass(pname, options or {}, where=where)
            if p.input_format is not current:
                raise ConfigError(
                    f"pass '{pname}' takes a {p.input_format.value} model but the chain has a "
                    f"{current.value} model at this point",
                    where=where,
                    hint="order the passes so each one gets the format it needs "
                    "(e.g. prune on the HF model, then export-gguf, then quantize-gguf)",
                )
            current = p.output_format
            chain.append(Step(p, where))
        variants[vname] = chain
    return Recipe(raw.name, raw.description, variants, source)
