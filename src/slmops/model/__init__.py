"""Model handles (HF directory, GGUF file, ONNX GenAI directory) and the lineage card."""

from slmops.model.card import CARD_FILE, LineageCard, StepRecord, read_card
from slmops.model.handle import ModelFormat, ModelHandle, open_model

__all__ = [
    "CARD_FILE",
    "LineageCard",
    "ModelFormat",
    "ModelHandle",
    "StepRecord",
    "open_model",
    "read_card",
]
