"""Run onnxruntime-genai's model builder, with a fix for configs that transformers 5 writes.

transformers 5 stores Gemma 3's RoPE settings per layer type (`rope_parameters:
{full_attention: {...}, sliding_attention: {...}}`, no `rope_local_base_freq`); the pinned
builder (0.18) reads the flat transformers 4 form and fails with KeyError 'rope_type' on every
Gemma 3 checkpoint. Before its Gemma3 model class starts, the nested form is flattened the way the
builder's own Gemma 4 class does it: global parameters stay in `rope_parameters`, the local
(sliding-window) theta goes to `rope_local_base_freq`. Everything else runs unchanged:

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


if __name__ == "__main__":
    _patch()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
