"""Configuration read once at start: what the model is, and how the engine may use the machine."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tokenmill.errors import InvalidParameterError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
QUANTIZATIONS = ("int8", "int4")  # weight formats; layers/quantization.py says what each is
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(slots=True)
class ModelConfig:
    """Shape of a Llama-family decoder; filled from config.json or GGUF metadata."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise InvalidParameterError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs: KV budget, batch limits, threads. Validated once in __post_init__."""

    model: str | None = None
    dtype: str = "float32"
    # What the KV cache stores: "auto" (as dtype), "float32", "float16" (half the bytes per token: twice
    # the context in the same memory, and half the bytes for decode attention, which reads it every step) or
    # "int8" (a little over a quarter: each token's head rounded to int8 with one scale).
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_gib: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    speculative: str | None = None  # "ngram:k=4" or "draft=PATH,k=4"; see engine/speculative.py
    quantization: str | None = None  # None (fp32 weights), "int8" or "int4"; see layers/quantization.py
    # int4 only: weights per (scale, min) pair. Stored per 32 whatever the group (the kernel reads a pair
    # per 32), so a longer group costs accuracy and saves no bytes: it is kept for compatibility.
    quantization_group_size: int = 32
    num_threads: int | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidParameterError(
                f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}", "dtype"
            )
        if self.kv_cache_dtype not in ("auto", "float32", "float16", "int8"):
            raise InvalidParameterError(
                f"kv_cache_dtype must be auto, float32, float16 or int8, got {self.kv_cache_dtype!r}",
                "kv_cache_dtype",
            )
        if self.quantization not in (None, *QUANTIZATIONS):
            raise InvalidParameterError(
                f"quantization must be one of none, {', '.join(QUANTIZATIONS)}; got {self.quantization!r}",
                "quantization",
            )
        if self.quantization_group_size not in INT4_GROUP_SIZES:
            raise InvalidParameterError(
                f"int4 group size must be one of {INT4_GROUP_SIZES}, got {self.quantization_group_size}",
                "quantization_group_size",
            )
        if self.block_size not in (8, 16, 32, 64, 128):
            raise InvalidParameterError(
                f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}", "block_size"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidParameterError("num_kv_blocks must be >= 1", "num_kv_blocks")
        if self.kv_cache_gib <= 0:
            raise InvalidParameterError("kv_cache_gib must be > 0", "kv_cache_gib")
        if self.max_num_seqs < 1:
            raise InvalidParameterError("max_num_seqs must be >= 1", "max_num_seqs")
        if self.max_num_batched_tokens < 1:
            raise InvalidParameterError("max_num_batched_tokens must be >= 1", "max_num_batched_tokens")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidParameterError("max_model_len must be >= 1", "max_model_len")
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidParameterError("num_threads must be >= 1", "num_threads")

    def resolved_kv_cache_dtype(self) -> str:
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    def resolved_threads(self) -> int:
        return self.num_threads or len(os.sched_getaffinity(0))
