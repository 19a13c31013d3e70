"""One seam for inference over llama.cpp, ONNX Runtime GenAI and transformers (the reference).

The edge agent uses this package too, so nothing heavy is imported at module level: each
backend imports its runtime library when a model is loaded.
"""

from slmops.runtimes.base import GenerationStats, Runtime, TokenStats, open_runtime

__all__ = ["GenerationStats", "Runtime", "TokenStats", "open_runtime"]
