"""Origin facts of an imported model, read from its own files (never from its name).

GGUF facts come from gguf_info; ONNX GenAI facts from genai_config.json and the graph (the
builder records no precision field); HF facts from config.json and the safetensors headers.
These go into the lineage card's `origin`, which later stages (reports, bundles) show as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmops.core.errors import ModelFormatError
from slmops.model.gguf_info import GgufInfo
from slmops.model.handle import (
    TOKENIZER_FILES,
    ModelFormat,
    _check_safetensors,
    hf_parameter_count,
    load_hf_config,
)


def gguf_origin(info: GgufInfo, sha: str) -> dict[str, Any]:
    return {
        "file": info.path.name,
        "source_path": str(info.path.resolve()),
        "sha256": sha.removeprefix("sha256:"),
        "format": ModelFormat.GGUF.value,
        "size_bytes": info.size_bytes,
        **info.to_dict(),
    }


def onnx_precision(model_file: Path) -> tuple[str | None, dict[str, Any]]:
    """Weight precision of an ONNX model, from its graph (not its external weights).

    The GenAI builder records no precision field, so this reads what it built: MatMulNBits
    nodes (weight-only int4/int8, their `bits` attribute) or the element type of the largest
    share of initializers (fp32/fp16/bf16)."""
    import onnx

    m = onnx.load(str(model_file), load_external_data=False)
    bits: set[int] = set()
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            bits.update(int(a.i) for a in node.attribute if a.name == "bits")
    by_type: dict[str, int] = {}
    for init in m.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type)
        n = 1
        for d in init.dims:
            n *= int(d)
        by_type[name] = by_type.get(name, 0) + n
    meta = {p.key: p.value for p in m.metadata_props}
    facts: dict[str, Any] = {"initializer_elements_by_type": by_type, "metadata_props": meta}
    if bits:
        facts["matmul_nbits"] = sorted(bits)
        return "INT" + "/".join(map(str, sorted(bits))), facts
    if by_type:
        top = max(by_type.items(), key=lambda kv: kv[1])[0]
        return {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16"}.get(top, top), facts
    return None, facts


def onnx_origin(src: Path) -> dict[str, Any]:
    cfg_path = src / "genai_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        model = cfg["model"]
        mtype = str(model["type"])
        filename = str(model["decoder"]["filename"])
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"unreadable genai_config.json: {exc}", where=cfg_path) from None
    except (KeyError, TypeError):
        raise ModelFormatError(
            "genai_config.json lacks model.type or model.decoder.filename",
            where=cfg_path,
            hint="pass a folder written by onnxruntime-genai's model builder",
        ) from None
    model_file = src / filename
    if not model_file.is_file():
        raise ModelFormatError(
            f"genai_config.json names {filename!r}, which is not in the folder",
            where=src,
            hint="copy the whole builder output folder (model.onnx, model.onnx.data, tokenizer)",
        )
    try:
        precision, facts = onnx_precision(model_file)
    except Exception as exc:  # onnx raises its own DecodeError family
        raise ModelFormatError(f"not a readable ONNX model: {exc}", where=model_file) from None
    return {
        "file": src.name,
        "source_path": str(src.resolve()),
        "format": ModelFormat.ONNX.value,
        "architecture": mtype,
        "quantization": precision,
        "context_length": model.get("context_length"),
        "model_file": filename,
        **facts,
    }


def hf_origin(src: Path) -> dict[str, Any]:
    cfg = load_hf_config(src)
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        raise ModelFormatError(
            "no *.safetensors weights",
            where=src,
            hint="save the model with save_pretrained() (safetensors is the default)",
        )
    for w in weights:
        _check_safetensors(w)
    if not any((src / t).exists() for t in TOKENIZER_FILES):
        raise ModelFormatError(
            "missing tokenizer (tokenizer.json or tokenizer.model)",
            where=src,
            hint="copy the tokenizer files of the original model into this folder",
        )
    archs = cfg.get("architectures") or []
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return {
        "file": src.name,
        "source_path": str(src.resolve()),
        "format": ModelFormat.HF.value,
        "architecture": archs[0] if archs else None,
        "model_type": cfg.get("model_type"),
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype") or (text_cfg or {}).get("dtype"),
        "parameters": hf_parameter_count(src),
        "context_length": cfg.get("max_position_embeddings"),
    }
