"""`slmops adapt` end to end: check inputs, train, evaluate, export, card, one atomic folder.

The output folder holds what a device or a later bundle needs and nothing else: the PEFT adapter
(adapter_model.safetensors + adapter_config.json), adapter.gguf for llama.cpp, evaluation.json,
and slmops-card.json whose step (kind "adapt") records the base's digest, so an adapter is never
applied to a base it was not trained on. Everything is checked (base, data, output) before the
base is loaded, and the folder appears only when complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slmops.adapt.data import load_site_data, read_data
from slmops.adapt.evaluate import evaluate_adapter, general_text
from slmops.adapt.export import GGUF_ADAPTER, export_gguf_lora, verify_gguf
from slmops.adapt.train import Progress, TrainOptions, token_stream, train_adapter
from slmops.core.atomic import atomic_directory, write_json_atomic
from slmops.core.digest import tree_digest, tree_size
from slmops.core.errors import ConfigError, ModelFormatError, UserInputError
from slmops.core.resources import current_rss_bytes, peak_rss_bytes
from slmops.model.card import LineageCard, StepRecord, read_card
from slmops.model.handle import ModelFormat, ModelHandle, detect_format, open_model

EVAL_FILE = "evaluation.json"
CARD_FORMAT = "lora-adapter"


@dataclass
class AdaptResult:
    path: Path
    card: LineageCard
    evaluation: dict[str, Any]
    training: dict[str, Any]
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "path": str(self.path),
            "base_digest": self.card.chain[-1].input_digest,
            "digest": self.card.digest,
            "size_bytes": self.card.size_bytes,
            "files": sorted(p.name for p in self.path.iterdir()),
            "training": self.training,
            "evaluation": self.evaluation,
            "wall_time_s": round(self.wall_time_s, 2),
        }


def open_base(base: Path) -> ModelHandle:
    """The base must be a Hugging Face causal LM folder: adapters train on its torch weights."""
    try:
        fmt = detect_format(base)
    except ModelFormatError:
        fmt = None
    if fmt is not ModelFormat.HF:
        found = f"a {fmt.value} model" if fmt else "not a model folder"
        raise ModelFormatError(
            f"the base must be a Hugging Face model folder ({found})",
            where=base,
            hint="pass the HF folder the GGUF/ONNX variants were made from (config.json, "
            "*.safetensors, tokenizer); adapters train on its weights",
        )
    return open_model(base, expect=ModelFormat.HF)


def check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        card = read_card(out) if (out / "slmops-card.json").exists() else None
        if card is None or card.format != CARD_FORMAT:
            raise UserInputError(
                "output folder exists and is not an adapter made by slmops adapt",
                where=out,
                hint="choose a new --out folder (an earlier adapter folder is replaced)",
            )


def adapt(
    base: Path,
    data: Path,
    out: Path,
    opts: TrainOptions,
    *,
    general: Path | None = None,
    base_gguf: Path | None = None,
    progress: Progress | None = None,
) -> AdaptResult:
    t0 = time.perf_counter()
    say = progress or (lambda _msg, _frac: None)
    handle = open_base(base)
    raw = read_data(data)
    check_out(out)
    if general is not None and not general.exists():
        raise ConfigError("general text not found", where=general, hint="pass a UTF-8 text file")
    if base_gguf is not None and not base_gguf.is_file():
        raise ConfigError("base GGUF not found", where=base_gguf, hint="pass the .gguf file")
    import torch  # noqa: F401  (imported before the baseline RSS, like pass workers do)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    site = load_site_data(data, tok, raw)
    train_ids = token_stream(tok, site.train)
    baseline = current_rss_bytes()
    started = datetime.now(UTC).isoformat()
    say("training", 0.0)
    model, training = train_adapter(base, train_ids, opts, progress)
    say("evaluating against the base", None)
    evaluation = evaluate_adapter(
        model, tok, site.heldout, general_text(base, general), training["seqlen"]
    )
    evaluation["data"] = site.describe()
    with atomic_directory(out, replace=True) as tmp:
        say("saving the adapter", None)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub says nothing here
        say("exporting the GGUF LoRA (llama.cpp converter)", None)
        export_gguf_lora(tmp, base, tmp / GGUF_ADAPTER)
        evaluation["gguf_adapter_bytes"] = (tmp / GGUF_ADAPTER).stat().st_size
        evaluation["onnx_genai_adapter"] = (
            "not exported: onnxruntime-genai 0.18 loads .onnx_adapter files only into models "
            "exported with LoRA inputs; its builder bakes adapters into the graph"
        )
        if base_gguf is not None:
            say("checking the adapter in llama.cpp", None)
            probe = token_stream(tok, site.heldout)[:64].tolist()
            evaluation["llama_cpp"] = verify_gguf(base_gguf, tmp / GGUF_ADAPTER, probe)
        write_json_atomic(tmp / EVAL_FILE, evaluation)
        digest, size = tree_digest(tmp), tree_size(tmp)
        step = StepRecord(
            pass_name="adapt",
            pass_version=1,
            kind="adapt",
            config={
                **opts.to_dict(),
                "data": str(data),
                "general": str(general) if general else None,
            },
            input_digest=handle.digest,
            output_digest=digest,
            input_bytes=handle.size_bytes,
            output_bytes=size,
            wall_time_s=round(time.perf_counter() - t0, 3),
            peak_rss_bytes=peak_rss_bytes(),
            baseline_rss_bytes=baseline,
            tool_versions=_versions(),
            started_at=started,
            report={**training, **evaluation, "base_digest": handle.digest},
        )
        card = LineageCard(
            format=CARD_FORMAT,
            digest=digest,
            size_bytes=size,
            origin_digest=handle.card.origin_digest if handle.card else handle.digest,
            origin_path=str(base.resolve()),
            chain=[*(handle.card.chain if handle.card else []), step],
        )
        card.write(tmp)
    return AdaptResult(out, card, evaluation, training, time.perf_counter() - t0)


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for dist in ("slmops", "torch", "transformers", "peft", "llama-cpp-python"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
