"""Bring your own files: turn a downloaded GGUF, ONNX GenAI or HF folder into a carded variant.

Everything downstream (evaluate, bundle, sign, rollout) reads lineage cards, so an imported
model becomes a first-class variant by getting a card whose root says where it came from: file
name, sha256 (what a user compares with the publisher's), format, quantization and architecture
read from the file's own metadata, and for GGUF the type of every tensor (k-quant mixtures fall
back to legacy types on narrow rows, which explains sizes that barely move down a ladder).

`dequantize_gguf` writes an HF folder from a GGUF for transformers-readable architectures, to
serve as the quality reference (or as input to optimize) when the original weights are not at
hand. Its card says plainly that it is a dequantized file, not the original weights, and it
shares the GGUF's origin digest so the imported file and everything optimized from the
dequantized folder are one family in one evaluation.

Outputs are built under a temp name, fsynced and renamed: a bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from slmops.core.atomic import TMP_PREFIX, atomic_directory, ensure_free_space
from slmops.core.digest import METADATA_FILES, sha256_file, tree_digest, tree_size
from slmops.core.errors import ConfigError, ModelFormatError
from slmops.core.resources import current_rss_bytes, own_peak_rss_bytes
from slmops.model.card import LineageCard, StepRecord
from slmops.model.gguf_info import read_gguf_info
from slmops.model.gguf_tokenizer import sentencepiece_from_gguf
from slmops.model.handle import ModelFormat
from slmops.model.origin import gguf_origin, hf_origin, onnx_origin

IMPORT_VERSION = 1
DEQUANTIZE_VERSION = 1
DTYPES = ("auto", "float32", "bfloat16", "float16")
# "auto" keeps fp32 (the most faithful reference) up to this many parameters, bf16 beyond.
AUTO_FP32_MAX_PARAMS = 1_500_000_000

Progress = Callable[[str], None]


@dataclass
class ImportResult:
    path: Path
    name: str
    format: str
    card: LineageCard
    wall_time_s: float
    peak_rss_bytes: int
    linked: bool

    def to_dict(self) -> dict[str, Any]:
        origin = dict(self.card.origin or {})
        origin.pop("tensors", None)  # hundreds of names: the card has them
        return {
            "path": str(self.path),
            "name": self.name,
            "format": self.format,
            "digest": self.card.digest,
            "origin_digest": self.card.origin_digest,
            "size_bytes": self.card.size_bytes,
            "quantization": self.card.quantization,
            "origin": origin,
            "wall_time_s": round(self.wall_time_s, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "hard_linked": self.linked,
        }


def _versions(*dists: str) -> dict[str, str]:
    out = {}
    for d in ("slmops", *dists):
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "not installed"
    return out


def resolve_source(source: Path) -> tuple[ModelFormat, Path]:
    """What SOURCE is, by content: (format, the .gguf file or the folder)."""
    src = Path(source).expanduser()
    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise ModelFormatError(
                "not a model file slmops can import (expected a .gguf file)",
                where=src,
                hint="pass a .gguf file, an ONNX GenAI folder (genai_config.json) or a Hugging "
                "Face folder (config.json + *.safetensors)",
            )
        return ModelFormat.GGUF, src
    if not src.is_dir():
        raise ModelFormatError("no such file or folder", where=src, hint="check the path")
    if (src / "genai_config.json").is_file():
        return ModelFormat.ONNX, src
    ggufs = sorted(p for p in src.glob("*.gguf") if not p.name.startswith("."))
    if len(ggufs) > 1:
        raise ModelFormatError(
            f"the folder holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs[:4])})",
            where=src,
            hint="pass the .gguf file to import itself (split GGUFs: merge them with "
            "llama-gguf-split --merge first)",
        )
    if ggufs:
        return ModelFormat.GGUF, ggufs[0]
    if (src / "config.json").is_file():
        return ModelFormat.HF, src
    raise ModelFormatError(
        "nothing to import here: no .gguf file, genai_config.json or config.json",
        where=src,
        hint="pass a .gguf file, an ONNX GenAI folder or a Hugging Face model folder",
    )


def _check_out(out: Path) -> None:
    if out.exists():
        raise ConfigError(
            "the output folder already exists",
            where=out,
            hint="choose another --out, or remove the old folder first",
        )


def _same_device(a: Path, b: Path) -> bool:
    probe = b
    while not probe.exists():
        probe = probe.parent
    return a.stat().st_dev == probe.stat().st_dev


# --- import ------------------------------------------------------------------------------------


def _card_for(
    tmp: Path,
    *,
    fmt: ModelFormat,
    name: str,
    origin: dict[str, Any],
    origin_digest: str,
    origin_path: str | None,
    quantization: str | None,
    step: dict[str, Any],
) -> LineageCard:
    digest = tree_digest(tmp)
    size = tree_size(tmp)
    rec = StepRecord(output_digest=digest, output_bytes=size, **step)
    return LineageCard(
        format=fmt.value,
        digest=digest,
        size_bytes=size,
        origin_digest=origin_digest,
        origin_path=origin_path,
        chain=[rec],
        variant=name,
        quantization=quantization,
        origin=origin,
    )


def import_model(
    source: Path, out: Path, *, name: str | None = None, progress: Progress | None = None
) -> ImportResult:
    """Validate SOURCE, link its files into a fresh variant folder OUT and card it."""
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    started = datetime.now(UTC).isoformat()
    baseline = current_rss_bytes()
    fmt, src = resolve_source(source)
    out = Path(out).expanduser()
    _check_out(out)
    say(f"reading {src.name}")
    if fmt is ModelFormat.GGUF:
        info = read_gguf_info(src)
        say(f"sha256 of {src.name}")
        origin_digest = sha256_file(src)
        origin = gguf_origin(info, origin_digest)
        quant: str | None = info.file_type
        files = [src]
        tools = _versions("gguf")
    elif fmt is ModelFormat.ONNX:
        origin = onnx_origin(src)
        quant = origin["quantization"]
        files = [p for p in sorted(src.rglob("*")) if p.is_file() and _keep(src, p)]
        tools = _versions("onnx")
        origin_digest = ""  # the folder's own digest, set below
    else:
        origin = hf_origin(src)
        quant = None
        files = [p for p in sorted(src.rglob("*")) if p.is_file() and _keep(src, p)]
        tools = _versions()
        origin_digest = ""
    in_bytes = sum(p.stat().st_size for p in files)
    if not _same_device(src, out.parent):
        ensure_free_space(out.parent, in_bytes, what=f"a copy of {src.name}")
    vname = name or (src.stem if fmt is ModelFormat.GGUF else src.name)
    linked = True
    say(f"linking into {out}")
    with atomic_directory(out) as tmp:
        root = src.parent if fmt is ModelFormat.GGUF else src
        for p in files:
            target = tmp / p.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)
                linked = False
        if not origin_digest:
            origin_digest = tree_digest(tmp)  # an ONNX/HF folder is its own original
        step = {
            "pass_name": "import",
            "pass_version": IMPORT_VERSION,
            "kind": "import",
            "config": {"source": str(Path(source).expanduser().resolve()), "name": vname},
            "input_digest": origin_digest,
            "input_bytes": in_bytes,
            "wall_time_s": round(time.perf_counter() - t0, 3),
            "peak_rss_bytes": own_peak_rss_bytes(),
            "baseline_rss_bytes": baseline,
            "tool_versions": tools,
            "started_at": started,
            "report": {"hard_linked": linked, "files": len(files)},
        }
        card = _card_for(
            tmp,
            fmt=fmt,
            name=vname,
            origin=origin,
            origin_digest=origin_digest,
            # An imported HF folder is a reference in its own right; an imported GGUF/ONNX file
            # is not, so evaluate asks for --reference instead of guessing.
            origin_path=str(out.resolve()) if fmt is ModelFormat.HF else None,
            quantization=quant,
            step=step,
        )
        card.write(tmp)
    return ImportResult(
        out, vname, fmt.value, card, time.perf_counter() - t0, own_peak_rss_bytes(), linked
    )


def _keep(root: Path, p: Path) -> bool:
    rel = p.relative_to(root)
    return p.name not in METADATA_FILES and not any(
        part.startswith(TMP_PREFIX) or part == ".cache" for part in rel.parts
    )


# --- dequantize --------------------------------------------------------------------------------


def transformers_gguf_architectures() -> list[str]:
    """GGUF architectures the installed transformers can dequantize."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(str(a) for a in GGUF_SUPPORTED_ARCHITECTURES)


def reference_note(quantization: str) -> str:
    return f"reference: dequantized {quantization}, not the original weights"


@contextlib.contextmanager
def _alone(gguf: Path) -> Iterator[Path]:
    """A folder holding only a link to the GGUF, so transformers reads nothing else that
    happens to sit next to it (a stray config.json would silently override the file's own)."""
    with tempfile.TemporaryDirectory(prefix="slmops-gguf-") as td:
        link = Path(td) / gguf.name
        link.symlink_to(gguf.resolve())
        yield Path(td)


def _resolve_dtype(dtype: str, parameters: int) -> str:
    if dtype not in DTYPES:
        raise ConfigError(
            f"unknown dtype {dtype!r}", where="--dtype", hint="one of: " + ", ".join(DTYPES)
        )
    if dtype == "auto":
        return "float32" if parameters <= AUTO_FP32_MAX_PARAMS else "bfloat16"
    return dtype


def dequantize_gguf(
    source: Path, out: Path, *, dtype: str = "auto", progress: Progress | None = None
) -> ImportResult:
    """GGUF -> HF folder (safetensors + tokenizer) through transformers' GGUF loader."""
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    started = datetime.now(UTC).isoformat()
    fmt, src = resolve_source(source)
    if fmt is not ModelFormat.GGUF:
        raise ModelFormatError(
            f"dequantize takes a .gguf file, this is a {fmt.value} model",
            where=source,
            hint="pass the .gguf file (or a folder holding exactly one)",
        )
    out = Path(out).expanduser()
    _check_out(out)
    say(f"reading {src.name}")
    info = read_gguf_info(src)
    import transformers

    supported = transformers_gguf_architectures()
    if info.architecture not in supported:
        raise ModelFormatError(
            f"transformers {transformers.__version__} cannot read GGUF architecture "
            f"{info.architecture!r}, so it cannot be dequantized to a Hugging Face folder",
            where=src,
            hint="import the file as a variant (`slmops import`) and evaluate it against the "
            "original Hugging Face model with --reference; transformers reads: "
            + ", ".join(supported),
        )
    target_dtype = _resolve_dtype(dtype, info.parameters)
    bytes_per = 4 if target_dtype == "float32" else 2
    ensure_free_space(out.parent, info.parameters * bytes_per, what="the dequantized weights")
    say(f"sha256 of {src.name}")
    sha = sha256_file(src)
    baseline = current_rss_bytes()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmops.model.hf import quiet_transformers

    quiet_transformers()  # its own bars would interleave with ours

    torch_dtype = getattr(torch, target_dtype)
    with _alone(src) as folder, atomic_directory(out) as tmp:
        say(f"dequantizing {info.file_type} to {target_dtype} (transformers)")
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=src.name, dtype=torch_dtype
        )
        # transformers marks the model as GGUF-quantized and refuses to save it; the weights in
        # memory are plain tensors already, so drop the marker (measured, see DESIGN.md).
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.config.dtype = target_dtype
        say("writing safetensors")
        model.save_pretrained(str(tmp))
        del model
        say("converting the tokenizer")
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=src.name)
        tok.save_pretrained(str(tmp))
        dropped = _drop_invented_tokens(tmp, info.metadata.get("tokenizer.ggml.tokens.count"))
        # a SentencePiece vocabulary goes back as tokenizer.model, so GGUF exports of this
        # folder tokenize exactly like the downloaded file (see model/gguf_tokenizer.py)
        sentencepiece_from_gguf(src, tmp / "tokenizer.model")
        for p in tmp.iterdir():  # transformers writes the weights 0600; a model folder is shared
            p.chmod(0o644)
        origin = gguf_origin(info, sha)
        origin["dequantized_to"] = target_dtype
        origin["reference_note"] = reference_note(info.file_type)
        step = {
            "pass_name": "dequantize",
            "pass_version": DEQUANTIZE_VERSION,
            "kind": "import",
            "config": {"source": str(src.resolve()), "dtype": target_dtype},
            "input_digest": sha,
            "input_bytes": info.size_bytes,
            "wall_time_s": round(time.perf_counter() - t0, 3),
            "peak_rss_bytes": own_peak_rss_bytes(),
            "baseline_rss_bytes": baseline,
            "tool_versions": _versions("gguf", "torch", "transformers"),
            "started_at": started,
            "report": {"note": origin["reference_note"], "dropped_added_tokens": dropped},
        }
        card = _card_for(
            tmp,
            fmt=ModelFormat.HF,
            name=out.name,
            origin=origin,
            origin_digest=sha,  # one family with the imported GGUF and its descendants
            origin_path=str(out.resolve()),
            quantization=None,  # the weights are plain floats now; the note says what they were
            step=step,
        )
        card.write(tmp)
    return ImportResult(
        out,
        out.name,
        ModelFormat.HF.value,
        card,
        time.perf_counter() - t0,
        own_peak_rss_bytes(),
        False,
    )


def _drop_invented_tokens(folder: Path, n_tokens: int | None) -> list[str]:
    """Remove added tokens the GGUF does not have (ids past its vocabulary).

    transformers' GGUF tokenizer conversion adds `<|endoftext|>` to byte-level BPE vocabularies
    that lack it; its id lies past the embedding rows, so the folder would fail every pass that
    checks tokenizer ids against the embedding (and index out of range at run time). Tokens the
    tokenizer config names as bos/eos/pad/unk are kept.
    """
    tok_path = folder / "tokenizer.json"
    if n_tokens is None or not tok_path.exists():
        return []
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    named = {str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    data = json.loads(tok_path.read_text(encoding="utf-8"))
    added = data.get("added_tokens") or []
    drop = [t for t in added if int(t.get("id", -1)) >= n_tokens and t.get("content") not in named]
    if not drop:
        return []
    ids = {int(t["id"]) for t in drop}
    data["added_tokens"] = [t for t in added if int(t.get("id", -1)) not in ids]
    tok_path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    if isinstance(cfg.get("added_tokens_decoder"), dict):
        cfg["added_tokens_decoder"] = {
            k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) not in ids
        }
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    return [str(t.get("content")) for t in drop]


def dequantized_note(card: LineageCard | None) -> str | None:
    """The plain-words note of a dequantized reference, None for an original model."""
    if card is None or not card.origin:
        return None
    note = card.origin.get("reference_note")
    return str(note) if note else None


__all__ = [
    "ImportResult",
    "dequantize_gguf",
    "dequantized_note",
    "import_model",
    "reference_note",
    "resolve_source",
    "transformers_gguf_architectures",
]
