"""Write a loaded model as a Hugging Face folder (config.json, model.safetensors, tokenizer files).

Peers that cannot read GGUF in fp32 (vLLM) must still see tokenmill's exact weights: the loader has already
dequantised the GGUF to fp32 and undone llama.cpp's Q/K row permutation, so its tensors carry HF names and
HF's layout and are written unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenmill.config import ModelConfig
from tokenmill.errors import UnsupportedArchitectureError
from tokenmill.models.loader import LoadedModel

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def hf_config(config: ModelConfig) -> dict:
    """The config.json HF transformers (and vLLM) expect for this architecture, fp32."""
    if config.architecture not in HF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"cannot export {config.architecture!r}; exportable: {', '.join(HF_ARCHITECTURES)}"
        )
    eos = list(config.eos_token_ids)
    raw = {
        "architectures": [HF_ARCHITECTURES[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if config.architecture == "mistral":
        raw["sliding_window"] = None
    return raw


def export_hf_folder(loaded: LoadedModel, folder: str | Path) -> Path:
    """Write `loaded` as an HF folder that `AutoModelForCausalLM.from_pretrained` and vLLM load."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = loaded.config
    weights = {
        name: tensor.to(torch.float32).contiguous()
        for name, tensor in loaded.weights.items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    tokenizer = loaded.tokenizer
    tokenizer.backend.save(str(out / "tokenizer.json"))
    special = tokenizer.special_tokens
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special.get("bos_token") or None,
        "eos_token": special.get("eos_token") or None,
        "add_bos_token": tokenizer.add_bos_token,
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.chat_template:
        tokenizer_config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out
