"""Device profiles: a built-in catalog (catalog.yaml) plus user files with the same schema.

A user file holds either one profile (a mapping with `name`) or `profiles: [...]`. Unknown keys
are refused with the file and the key named; a user profile with a built-in name replaces it.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from slmops.core.config import StrictModel, read_structured_file
from slmops.core.errors import ConfigError

Runtime = Literal["gguf", "onnx-genai"]


class Budgets(StrictModel):
    max_ttft_ms: float = Field(
        gt=0, description="time to first token for a prompt of prompt_tokens"
    )
    min_decode_tps: float = Field(ge=0, description="minimum decode tokens per second")
    max_kld: float = Field(
        gt=0, description="quality floor: mean KL divergence against the reference"
    )


class CostModel(StrictModel):
    hardware_usd: float = Field(ge=0)
    lifetime_years: float = Field(gt=0)
    power_watts: float = Field(ge=0, description="draw while generating")
    energy_usd_per_kwh: float = Field(0.20, ge=0)
    utilization: float = Field(
        0.25, gt=0, le=1, description="fraction of the device's life spent generating"
    )


class DeviceProfile(StrictModel):
    name: str
    description: str = ""
    arch: Literal["arm64", "x86_64"]
    cores: int = Field(gt=0, description="cores the model may use")
    ram_mb: int = Field(gt=0, description="RAM available to the model, not the device total")
    storage_mb: int = Field(gt=0)
    runtimes: list[Runtime] = Field(min_length=1)
    context_length: int = Field(2048, gt=0)
    prompt_tokens: int = Field(128, gt=0, description="typical prompt length for the TTFT budget")
    relative_speed: float = Field(
        gt=0, description="device throughput / host throughput (estimate)"
    )
    budgets: Budgets
    cost: CostModel
    required: bool = Field(
        True, description="the gate fails when a required profile has no fitting variant"
    )
    source: str = Field("built-in", description="where the profile was defined")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", v):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-'")
        return v


class _ProfileFile(StrictModel):
    profiles: list[dict[str, Any]] = Field(min_length=1)


def _parse(data: Any, source: str) -> list[DeviceProfile]:
    if isinstance(data, dict) and "profiles" in data:
        items = _ProfileFile.from_data(data, source=source).profiles
    elif isinstance(data, dict):
        items = [data]
    else:
        raise ConfigError("expected a profile mapping or `profiles: [...]`", where=source)
    out = []
    for i, item in enumerate(items):
        where = (
            f"{source}: profiles[{i}]" if len(items) > 1 or "profiles" in (data or {}) else source
        )
        out.append(
            DeviceProfile.from_data({**item, "source": item.get("source", source)}, source=where)
        )
    return out


def builtin_profiles() -> dict[str, DeviceProfile]:
    path = resources.files("slmops.evaluate.profiles") / "catalog.yaml"
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {
        p.name: p.model_copy(update={"source": "built-in"})
        for p in _parse(data, "built-in catalog")
    }


def load_profile_file(path: Path) -> list[DeviceProfile]:
    return _parse(read_structured_file(path), str(path))


def catalog(extra_files: list[Path] | None = None) -> dict[str, DeviceProfile]:
    profiles = builtin_profiles()
    for f in extra_files or []:
        for p in load_profile_file(f):
            profiles[p.name] = p
    return profiles


def resolve_profiles(
    spec: str | list[str], extra_files: list[Path] | None = None
) -> list[DeviceProfile]:
    """Resolve "a,b,c" (names or YAML paths) to profiles, in order, refusing unknown names."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    files = list(extra_files or [])
    names: list[str] = []
    for item in items:
        if item.endswith((".yaml", ".yml", ".json")):
            files.append(Path(item))
            names.extend(p.name for p in load_profile_file(Path(item)))
        else:
            names.append(item)
    cat = catalog(files)
    unknown = [n for n in names if n not in cat]
    if unknown:
        raise ConfigError(
            f"unknown device profile(s): {', '.join(unknown)}",
            hint="run `slmops profiles` to list them, or pass a profile YAML file",
        )
    if not names:
        raise ConfigError(
            "no device profiles given", hint="e.g. --profiles rpi5-8gb,x86-minipc-16gb"
        )
    return [cat[n] for n in dict.fromkeys(names)]
