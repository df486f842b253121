"""The Llama family (llama, mistral, qwen2 with QKV bias, qwen3 with q/k norm) over a paged KV cache.

Weights are fused at load (Q|K|V in one matrix, gate|up in one) so each layer runs four matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.config import ModelConfig
from tokenmill.layers.attention import AttentionContext, paged_attention
from tokenmill.layers.linear import DenseLinear
from tokenmill.layers.norm import rms_norm
from tokenmill.layers.rotary import RotaryEmbedding


@dataclass(slots=True)
class DecoderLayerWeights:
    input_norm: torch.Tensor
    qkv: DenseLinear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: DenseLinear
    post_norm: torch.Tensor
    gate_up: DenseLinear
    down: DenseLinear


class LlamaModel:
    """Stateless apart from weights: the KV cache and attention metadata come in with every call."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        max_positions: int,
    ) -> None:
        self.config = config
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        head = self.embed if config.tie_word_embeddings else weights["lm_head.weight"]
        self.lm_head = DenseLinear(head)
        self.layers = [self._layer(weights, i) for i in range(config.num_layers)]
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5

    def _layer(self, weights: dict[str, torch.Tensor], i: int) -> DecoderLayerWeights:
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        bias = None
        if self.config.attention_bias and attn + "q_proj.bias" in weights:
            bias = torch.cat([weights[attn + f"{n}_proj.bias"] for n in "qkv"])
        qkv = torch.cat([weights[attn + f"{n}_proj.weight"] for n in "qkv"])
        gate_up = torch.cat([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]])
        return DecoderLayerWeights(
            input_norm=weights[p + "input_layernorm.weight"],
            qkv=DenseLinear(qkv, bias),
            q_norm=weights.get(attn + "q_norm.weight") if self.config.qk_norm else None,
            k_norm=weights.get(attn + "k_norm.weight") if self.config.qk_norm else None,
            o_proj=DenseLinear(weights[attn + "o_proj.weight"]),
            post_norm=weights[p + "post_attention_layernorm.weight"],
            gate_up=DenseLinear(gate_up),
            down=DenseLinear(weights[p + "mlp.down_proj.weight"]),
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: [layers, 2, slots, Hkv, D]. Returns final hidden [T, H]."""
        cfg = self.config
        tokens = input_ids.shape[0]
        hidden = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary.tables(positions, hidden.dtype)
        for index, layer in enumerate(self.layers):
            x = rms_norm(hidden, layer.input_norm, cfg.rms_norm_eps)
            qkv = layer.qkv(x)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(tokens, cfg.num_heads, cfg.head_dim)
            k = k.reshape(tokens, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(tokens, cfg.num_kv_heads, cfg.head_dim)
            if layer.q_norm is not None:
                q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
            q, k = self.rotary.apply(q, k, cos, sin)
            attended = paged_attention(q, k, v, kv_cache[index, 0], kv_cache[index, 1], ctx, self.scale)
            hidden = hidden + layer.o_proj(attended.reshape(tokens, self.q_size))
            x = rms_norm(hidden, layer.post_norm, cfg.rms_norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            hidden = hidden + layer.down(F.silu(gate) * up)
        return rms_norm(hidden, self.norm, cfg.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
