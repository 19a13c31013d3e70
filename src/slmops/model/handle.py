"""Model handles: a validated pointer to a model on disk and the facts passes need about it.

Detection is by content, not by name: an HF directory has config.json and weights, a GGUF
directory holds one *.gguf file (checked by magic), an ONNX GenAI directory has genai_config.json.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from slmops.core.digest import tree_digest, tree_size
from slmops.core.errors import ModelFormatError
from slmops.model.arch import ArchInfo, is_causal_lm, read_arch
from slmops.model.card import LineageCard, read_card

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
GGUF_MAGIC = b"GGUF"


class ModelFormat(StrEnum):
    HF = "hf"
    GGUF = "gguf"
    ONNX = "onnx-genai"


@dataclass
class ModelHandle:
    path: Path
    format: ModelFormat
    card: LineageCard | None = None
    _digest: str | None = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        """Content digest; taken from a trusted card when present, else computed (streamed)."""
        if self._digest is None:
            self._digest = self.card.digest if self.card else tree_digest(self.path)
        return self._digest

    @property
    def size_bytes(self) -> int:
        return self.card.size_bytes if self.card else tree_size(self.path)

    @property
    def gguf_file(self) -> Path:
        files = sorted(self.path.glob("*.gguf"))
        if self.format is not ModelFormat.GGUF or not files:
            raise ModelFormatError("no GGUF file here", where=self.path)
        return files[0]

    def hf_config(self) -> dict[str, Any]:
        if self.format is not ModelFormat.HF:
            raise ModelFormatError(
                f"expected a Hugging Face model, got {self.format}", where=self.path
            )
        return load_hf_config(self.path)

    @property
    def architecture(self) -> str:
        """The config's model_type (llama, qwen3, gemma3_text, ...)."""
        return str(self.hf_config().get("model_type") or "")

    def arch(self) -> ArchInfo:
        """Structural facts (layouts, norms, vocabulary, converters) read without loading weights."""
        return read_arch(self.path)


def load_hf_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(
            "not a Hugging Face model directory (no config.json)",
            where=path,
            hint="pass the folder that holds config.json, the *.safetensors weights and the tokenizer",
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"config.json is not valid JSON: {exc}", where=cfg_path) from None
    if not isinstance(cfg, dict):
        raise ModelFormatError("config.json is not a JSON object", where=cfg_path)
    return cfg


def _check_safetensors(path: Path) -> None:
    """Cheap structural check of a safetensors file: header length and JSON header parse."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"declared header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
        )
        if 8 + n + end != size:
            raise ValueError(
                f"tensor data ends at byte {8 + n + end} but the file has {size} bytes (truncated?)"
            )
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(
            f"corrupt safetensors file: {exc}",
            where=path,
            hint="re-download or re-export the weights",
        ) from None


def validate_hf_dir(path: Path) -> None:
    cfg = load_hf_config(path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if not is_causal_lm(cfg):
        what = "encoder-decoder" if cfg.get("is_encoder_decoder") else "not a *ForCausalLM model"
        raise ModelFormatError(
            f"unsupported architecture {arch!r}: slmops optimizes decoder-only causal language "
            f"models ({what})",
            where=path / "config.json",
            hint="use the causal LM checkpoint of the model, i.e. config.json `architectures` "
            "naming a *ForCausalLM class such as LlamaForCausalLM, Qwen3ForCausalLM or "
            "Gemma3ForCausalLM",
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelFormatError(
            "no *.safetensors weights",
            where=path,
            hint="save the model with save_pretrained(safe_serialization=True)",
        )
    for w in weights:
        _check_safetensors(w)
    if not any((path / t).exists() for t in TOKENIZER_FILES):
        raise ModelFormatError(
            "missing tokenizer (tokenizer.json or tokenizer.model)",
            where=path,
            hint="copy the tokenizer files of the original model into this folder",
        )


def detect_format(path: Path) -> ModelFormat:
    if path.is_file() and path.suffix == ".gguf":
        return ModelFormat.GGUF
    if not path.is_dir():
        raise ModelFormatError("no such model directory", where=path, hint="check the path")
    if (path / "genai_config.json").exists():
        return ModelFormat.ONNX
    if any(path.glob("*.gguf")):
        return ModelFormat.GGUF
    if (path / "config.json").exists():
        return ModelFormat.HF
    raise ModelFormatError(
        "not a model directory: no config.json, *.gguf or genai_config.json",
        where=path,
        hint="pass a Hugging Face model folder (or a slmops variant folder)",
    )


def open_model(path: str | Path, expect: ModelFormat | None = None) -> ModelHandle:
    """Open and validate a model; raises ModelFormatError (exit 2) with a fix-it hint."""
    p = Path(path).expanduser()
    fmt = detect_format(p)
    if fmt is ModelFormat.GGUF and p.is_file():
        raise ModelFormatError("pass the directory that holds the .gguf file", where=p)
    if expect is not None and fmt is not expect:
        raise ModelFormatError(f"expected a {expect.value} model, found {fmt.value}", where=p)
    if fmt is ModelFormat.HF:
        validate_hf_dir(p)
    elif fmt is ModelFormat.GGUF:
        files = sorted(p.glob("*.gguf"))
        if len(files) != 1:
            raise ModelFormatError(f"expected exactly one .gguf file, found {len(files)}", where=p)
        with files[0].open("rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                raise ModelFormatError("not a GGUF file (bad magic)", where=files[0])
    return ModelHandle(path=p, format=fmt, card=read_card(p))


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".data", ".bin")


def weights_bytes(path: Path) -> int:
    """Bytes of weight files only (not tokenizer, text files or cards)."""
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def hf_parameter_count(path: Path) -> int:
    """Parameter count from safetensors headers, without loading any tensor."""
    total = 0
    for w in sorted(path.glob("*.safetensors")):
        with w.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            count = 1
            for d in v["shape"]:
                count *= int(d)
            total += count
    return total
