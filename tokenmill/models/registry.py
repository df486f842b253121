"""Architecture name -> model class; the one place a new family is plugged in."""

from __future__ import annotations

from tokenmill.config import ModelConfig
from tokenmill.errors import UnsupportedArchitectureError
from tokenmill.models.llama import LlamaModel

MODEL_CLASSES = {"llama": LlamaModel, "mistral": LlamaModel, "qwen2": LlamaModel, "qwen3": LlamaModel}


def model_class(config: ModelConfig) -> type[LlamaModel]:
    try:
        return MODEL_CLASSES[config.architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {config.architecture!r} is not supported; supported: {', '.join(MODEL_CLASSES)}"
        ) from None
