"""One error hierarchy for the whole project.

    SlmopsError                 base; carries what went wrong, where, and how to fix it
    ├── UserInputError          exit code 2: the user gave something wrong
    │   ├── ConfigError         a YAML/JSON file or option failed validation
    │   ├── ModelFormatError    a path is not a usable model of the expected kind
    │   ├── UnknownPassError    a recipe names a pass that is not registered
    │   └── ResourceError       the machine lacks disk (or memory) for the request
    ├── CheckFailedError        exit code 1: a gate or verification check failed
    └── ToolError               exit code 1: an external tool (converter, quantizer) failed

Errors become CLI output or HTTP responses only at the edge (cli/, server/api/), never here.
"""

from __future__ import annotations

from pathlib import Path


class SlmopsError(Exception):
    """Base error. ``where`` names the file, key or step; ``hint`` says what to do next."""

    exit_code = 1

    def __init__(self, message: str, *, where: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.where = str(where) if where is not None else None
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = self.message
        if self.where:
            text = f"{self.where}: {text}"
        if self.hint:
            text = f"{text}\n  hint: {self.hint}"
        return text

    def to_dict(self) -> dict[str, str | int | None]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "where": self.where,
            "hint": self.hint,
            "exit_code": self.exit_code,
        }


class UserInputError(SlmopsError):
    exit_code = 2


class ConfigError(UserInputError):
    pass


class ModelFormatError(UserInputError):
    pass


class UnknownPassError(UserInputError):
    pass


class ResourceError(UserInputError):
    pass


class CheckFailedError(SlmopsError):
    exit_code = 1


class ToolError(SlmopsError):
    exit_code = 1
