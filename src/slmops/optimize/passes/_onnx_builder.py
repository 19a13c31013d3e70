"""Run onnxruntime-genai's model builder, with a fix for configs that transformers 5 writes.

transformers 5 stores Gemma 3's RoPE settings per layer type (`rope_parameters:
{full_attention: {...}, sliding_attention: {...}}`, no `rope_local_base_freq`); the pinned
builder (0.18) reads the flat transformers 4 form and fails with KeyError 'rope_type' on every
Gemma 3 checkpoint. Before its Gemma3 model class starts, the nested form is flattened the way the
builder's own Gemma 4 class does it: global parameters stay in `rope_parameters`, the local
(sliding-window) theta goes to `rope_local_base_freq`.

Second, memory: the builder holds the whole fp32 graph in memory and, to quantize it, copies
it into a ModelProto (``ir.to_proto``): two fp32 copies of every weight plus the untied output
layer (peak RSS 3.9 GB for Gemma 3 270M, 3.7x its fp32 size). Before quantizing, the fp32 graph
is written to the temporary cache folder and reloaded as external (memory-mapped) tensors, so
the quantizer reads one weight at a time from the page cache. Everything else runs unchanged:

    python -m slmops.optimize.passes._onnx_builder -i MODEL -o OUT -p int4 -e cpu
"""

from __future__ import annotations

import runpy
from typing import Any


def flatten_rope_per_layer_type(config: Any) -> None:
    """Nested per-layer-type rope_parameters -> flat global ones + rope_local_base_freq."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "full_attention" not in params:
        return
    local = params.get("sliding_attention") or {}
    if not hasattr(config, "rope_local_base_freq") or config.rope_local_base_freq is None:
        config.rope_local_base_freq = local.get("rope_theta", 10_000.0)
    config.rope_parameters = dict(params["full_attention"])


def _patch() -> None:
    import importlib

    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)

    # builder.py imports its classes as the top-level package `builders`, not through
    # onnxruntime_genai.models.builders: patch the module object it will really use.
    gemma = importlib.import_module("builders.gemma")
    cls: Any = gemma.Gemma3Model
    original = cls.__init__

    def init(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        flatten_rope_per_layer_type(config)
        original(self, config, *args, **kwargs)

    cls.__init__ = init
    _spill_fp32_before_quantizing(importlib.import_module("builders.base").Model)


def _spill_fp32_before_quantizing(model_cls: Any) -> None:
    """Quantize from fp32 weights on disk instead of two in-memory copies.

    The tensors reloaded by ``ir.load`` and carried through the quantizer's ModelProto refer to
    their data file by a relative name, so the working directory is the spill folder while the
    model is quantized and saved (the builder runs alone in its own process).
    """
    import gc
    import os

    import onnx_ir as ir

    original_to_nbits, original_save = model_cls.to_nbits, model_cls.save_model

    def to_nbits(self: Any) -> Any:
        spill = os.path.join(os.path.abspath(self.cache_dir), "fp32-spill")
        os.makedirs(spill, exist_ok=True)
        path = os.path.join(spill, "model.onnx")
        ir.save(self.model, path, external_data="model.onnx.data", size_threshold_bytes=0)
        self.model = ir.load(path)
        # the builder's own handles on the in-memory graph keep every fp32 tensor alive
        self.graph, self.values = self.model.graph, {}
        gc.collect()
        os.chdir(spill)
        return original_to_nbits(self)

    def save_model(self: Any, out_dir: str) -> None:
        here = os.getcwd()
        try:
            original_save(self, os.path.abspath(out_dir))
        finally:
            os.chdir(here)

    model_cls.to_nbits, model_cls.save_model = to_nbits, save_model


if __name__ == "__main__":
    _patch()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
