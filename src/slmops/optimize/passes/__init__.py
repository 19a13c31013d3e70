"""Built-in passes, one per module; `base.registry()` imports the modules listed in BUILTIN."""

BUILTIN = (
    "export_gguf",
    "quantize_gguf",
    "export_onnx",
    "prune_magnitude",
    "prune_nm",
    "prune_wanda",
    "prune_structured",
    "distill",
)
