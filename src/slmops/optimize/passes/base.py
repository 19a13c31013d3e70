"""Pass base class and registry.

A pass is a class with a typed config and one method, model in, model out, into a fresh
directory. Subclasses register themselves by `name` when their module is imported; modules keep
heavy imports (torch, llama_cpp, onnxruntime_genai) inside `run`, so listing passes is cheap.
"""

from __future__ import annotations

import importlib.metadata
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import ValidationError

from slmops.core.config import StrictModel, config_error_from_validation
from slmops.core.digest import sha256_file, tree_digest
from slmops.core.errors import ModelFormatError, UnknownPassError
from slmops.model.arch import ArchInfo
from slmops.model.card import read_card
from slmops.model.handle import ModelFormat, ModelHandle


class PassConfig(StrictModel):
    """Base for pass options; unknown options are refused."""

    content_fields: ClassVar[tuple[str, ...]] = ()
    """Options naming a file or folder whose content the output depends on (calibration text, a
    teacher model): the step cache keys on their digests, so a file edited in place is a miss."""

    def content_digests(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in self.content_fields:
            value = getattr(self, name, None)
            if value is None:
                continue
            path = Path(value)
            if path.is_file():
                out[name] = sha256_file(path)
            elif path.is_dir():
                card = read_card(path)  # a model folder with a lineage card: its content digest
                out[name] = card.digest if card is not None else tree_digest(path)
            else:
                out[name] = "missing"  # the pass itself reports it
        return out


@dataclass
class PassResult:
    """What a pass reports beside its output files; lands in the step's card."""

    report: dict[str, Any] = field(default_factory=dict)
    sparsity: dict[str, Any] | None = None
    structure: dict[str, Any] | None = None
    quantization: str | None = None


ConfigT = TypeVar("ConfigT", bound=PassConfig)


class Pass(ABC, Generic[ConfigT]):
    name: ClassVar[str]
    version: ClassVar[int] = 1
    summary: ClassVar[str]
    # What a variant made by this pass is, for cards and reports: export, quantize,
    # prune-unstructured, prune-semi-structured, prune-structured.
    kind: ClassVar[str]
    input_format: ClassVar[ModelFormat]
    output_format: ClassVar[ModelFormat]
    Config: ClassVar[type[PassConfig]] = PassConfig
    # Python distributions whose versions go into the card.
    tools: ClassVar[tuple[str, ...]] = ()

    _registry: ClassVar[dict[str, type[Pass[Any]]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Pass._registry[cls.name] = cls

    def __init__(self, config: ConfigT) -> None:
        self.config: ConfigT = config

    def prepare(self) -> None:
        """Import heavy dependencies; the worker measures baseline RSS after this."""

    @abstractmethod
    def run(self, model: ModelHandle, out_dir: Path) -> PassResult:
        """Write the new model into `out_dir` (empty, already created)."""

    @classmethod
    def check(cls, arch: ArchInfo) -> list[str]:
        """What this pass needs and `arch` lacks, in words (empty: the pass applies).

        Read from structure (tensor names and shapes, config, tokenizer files, the converters'
        architecture lists), never from an allow-list of names. Passes that take GGUF or ONNX
        input have nothing to check on the HF side.
        """
        return []

    def check_model(self, arch: ArchInfo) -> list[str]:
        """`check` plus what this configuration needs (widths divisible by m, a target, ...)."""
        return type(self).check(arch)

    def refuse_if_unfit(self, model: ModelHandle) -> None:
        """Raise ModelFormatError (exit 2) naming what is missing, before a tool fails obscurely
        (the engine checks whole recipes up front; this covers a pass called on its own)."""
        if self.input_format is not ModelFormat.HF:
            return
        arch = model.arch()
        missing = self.check_model(arch)
        if missing:
            raise ModelFormatError(
                f"pass '{self.name}' cannot handle {arch.architecture}: needs "
                + "; ".join(missing),
                where=model.path,
            )

    def predict(self, arch: ArchInfo) -> ArchInfo:
        """The structure of this pass's output, so the next steps of a chain can be checked
        before anything runs (most passes keep it; structured pruning changes the numbers)."""
        return arch

    def estimate_output_bytes(self, model: ModelHandle) -> int:
        """Upper bound used to refuse early when the disk is too small."""
        return 2 * model.size_bytes

    @classmethod
    def tool_versions(cls) -> dict[str, str]:
        out: dict[str, str] = {}
        for dist in ("slmops", *cls.tools):
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                out[dist] = "not installed"
        return out

    @classmethod
    def describe(cls) -> dict[str, Any]:
        options = []
        schema = cls.Config.model_json_schema()
        required = set(schema.get("required", []))
        for key, prop in schema.get("properties", {}).items():
            field_info = cls.Config.model_fields[key]
            default = (
                None
                if field_info.is_required()
                else field_info.get_default(call_default_factory=True)
            )
            options.append(
                {
                    "name": key,
                    "type": _type_label(prop),
                    "default": default,
                    "required": key in required,
                    "description": prop.get("description", ""),
                }
            )
        return {
            "name": cls.name,
            "version": cls.version,
            "kind": cls.kind,
            "input": cls.input_format.value,
            "output": cls.output_format.value,
            "summary": cls.summary,
            "options": options,
        }


def _type_label(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " | ".join(str(v) for v in prop["enum"])
    if "anyOf" in prop:
        return " | ".join(_type_label(p) for p in prop["anyOf"])
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    t = prop.get("type", "any")
    if t == "array":
        return f"list[{_type_label(prop.get('items', {}))}]"
    return str(t)


def registry() -> dict[str, type[Pass[Any]]]:
    """Every registered pass; importing a built-in module is what registers it."""
    import importlib

    from slmops.optimize.passes import BUILTIN

    for mod in BUILTIN:
        importlib.import_module(f"slmops.optimize.passes.{mod}")

    return dict(sorted(Pass._registry.items()))


def get_pass_class(name: str, *, where: str | None = None) -> type[Pass[Any]]:
    passes = registry()
    if name not in passes:
        import difflib

        close = difflib.get_close_matches(name, passes, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UnknownPassError(
            f"unknown pass '{name}'",
            where=where,
            hint=hint + "run `slmops passes` to list them: " + ", ".join(passes),
        )
    return passes[name]


def build_pass(name: str, options: dict[str, Any] | None, *, where: str | None = None) -> Pass[Any]:
    cls = get_pass_class(name, where=where)
    try:
        config = cls.Config.model_validate(options or {})
    except ValidationError as exc:
        raise config_error_from_validation(exc, source=where or f"pass {name}") from None
    return cls(config)


def applicability(arch: ArchInfo) -> dict[str, list[str]]:
    """Per registered pass: what it needs and this model lacks (empty list: it applies)."""
    return {name: cls.check(arch) for name, cls in registry().items()}
