"""Re-encoding the shipped GGUF for llama.cpp keeps its metadata and its weights (to the new precision)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.bench.gguf_convert import convert_gguf
from tokenmill.errors import InvalidParameterError
from tokenmill.models.loader import default_model_path, load_model


def test_q8_0_copy_of_the_default_model_loads_with_close_weights(smollm_loaded, tmp_path):
    path = convert_gguf(default_model_path(), "q8_0", tmp_path)
    assert convert_gguf(default_model_path(), "q8_0", tmp_path) == path  # cached
    converted = load_model(path)
    assert converted.config == smollm_loaded.config
    assert converted.tokenizer.encode("Hello, world!") == smollm_loaded.tokenizer.encode("Hello, world!")
    assert converted.tokenizer.chat_template == smollm_loaded.tokenizer.chat_template
    for name, weight in smollm_loaded.weights.items():
        step = weight.abs().max() / 127  # q8_0's step is at most the tensor's absmax / 127
        assert torch.allclose(converted.weights[name], weight, atol=float(step)), name


def test_unknown_target_is_a_typed_error(tmp_path):
    with pytest.raises(InvalidParameterError, match="q8_0"):
        convert_gguf(default_model_path(), "q3_k", tmp_path)
