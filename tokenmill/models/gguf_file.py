"""GGUF files (llama.cpp's format) -> ModelConfig, HF-named fp32 tensors and the tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tqdm.auto import tqdm

from tokenmill.config import SUPPORTED_ARCHITECTURES, ModelConfig
from tokenmill.errors import ModelLoadError, UnsupportedArchitectureError
from tokenmill.models.tokenizer import Tokenizer, tokenizer_from_gguf_metadata

SUPPORTED_TENSOR_TYPES = {
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
}

# GGUF tensor name (inside blk.N.) -> HF name (inside model.layers.N.)
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field_value(reader: GGUFReader, key: str) -> Any:
    field = reader.fields[key]
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return list(field.contents())
    return field.contents()


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    return {key: _field_value(reader, key) for key in reader.fields if not key.startswith("GGUF.")}


def _unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time interleaving of Q/K rows back to HF's half-split rotary layout."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _config_from_metadata(meta: dict[str, Any], path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path.name}: architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{path.name}: GGUF metadata lacks {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    rope_scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    return ModelConfig(
        architecture=arch,
        vocab_size=int(meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(key("context_length", 2048)),
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=str(meta.get("general.name", path.stem)),
    )


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read a GGUF file; any malformed or truncated content becomes a ModelLoadError naming the file."""
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/IndexError/struct.error on damaged files
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt or truncated?): {exc}") from exc
    meta = _metadata(reader)
    config = _config_from_metadata(meta, path)
    tensors: dict[str, torch.Tensor] = {}
    progress = tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=None, leave=False)
    for tensor in progress:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(
                f"{path.name}: tensor {tensor.name} has type {tensor.tensor_type.name}; "
                "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"
            )
        try:
            array = dequantize(tensor.data, tensor.tensor_type).reshape(
                tuple(reversed(tensor.shape.tolist()))
            )
        except Exception as exc:
            raise ModelLoadError(f"{path.name}: tensor {tensor.name} is damaged: {exc}") from exc
        if config.architecture in ("llama", "mistral"):
            if name.endswith("q_proj.weight"):
                array = _unpermute_rows(array, config.num_heads)
            elif name.endswith("k_proj.weight"):
                array = _unpermute_rows(array, config.num_kv_heads)
        tensors[name] = torch.from_numpy(np.array(array, dtype=np.float32, order="C")).to(dtype)
    config.tie_word_embeddings = "lm_head.weight" not in tensors
    tokenizer = tokenizer_from_gguf_metadata(meta)
    return config, tensors, tokenizer


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if gguf_name.startswith("blk."):
        _, index, rest = gguf_name.split(".", 2)
        if rest in _LAYER_TENSORS:
            return f"model.layers.{index}.{_LAYER_TENSORS[rest]}"
    return None
