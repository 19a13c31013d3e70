"""Config base: strict pydantic models loaded from YAML or JSON with precise error messages.

Unknown keys are refused (a typo in a recipe must not be silently ignored), and every
validation error names the file and the dotted path of the offending key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from slmops.core.errors import ConfigError


class StrictModel(BaseModel):
    """Base for every config and wire schema: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        return cls.from_data(read_structured_file(path), source=str(path))

    @classmethod
    def from_data(cls, data: Any, *, source: str = "<input>") -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise config_error_from_validation(exc, source=source) from None


def read_structured_file(path: str | Path) -> Any:
    """Parse a YAML or JSON file, turning I/O and syntax problems into ConfigError."""
    p = Path(path)
    if not p.exists():
        raise ConfigError("file not found", where=p, hint="check the path")
    if not p.is_file():
        raise ConfigError("not a file", where=p, hint="pass a YAML or JSON file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read file: {exc}", where=p) from None
    try:
        if p.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"not valid {p.suffix.lstrip('.').upper() or 'YAML'}: {exc}", where=p
        ) from None


def config_error_from_validation(exc: ValidationError, *, source: str) -> ConfigError:
    """Render pydantic errors as `file: key.path: message` lines, the first one leading."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{loc}'"
        elif err["type"] == "missing":
            msg = f"missing required key '{loc}'"
        else:
            msg = f"'{loc}': {err['msg']}"
        lines.append(msg)
    message = (
        lines[0] if len(lines) == 1 else lines[0] + "".join(f"\n  also: {m}" for m in lines[1:])
    )
    return ConfigError(message, where=source, hint="fix the key or value; unknown keys are refused")
