"""The draft as a trainable torch module: a few Llama decoder layers on the target's frozen embeddings.

Same maths as models/llama.py (RMSNorm, half-split rotary, grouped-query attention, SiLU-gated MLP), but
dense, causal over whole padded sequences and differentiable, so torch autograd and AdamW can train it.
Layers start as copies of the target's first layers; the final norm starts as the target's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.norm import rms_norm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.draft import LAYER_NAMES


def first_layers(num_layers: int) -> list[int]:
    """Target layers to start from: the first ones. Measured on SmolLM2 (16 answers, 8k-token head),
    every choice starts far from the target (cross-entropy 11-36 nats): later layers expect the large
    activations built up by the layers before them, so the first layers are the calmest start."""
    return list(range(num_layers))


def layer_parameters(target_weights: dict[str, torch.Tensor], source: int) -> nn.ParameterDict:
    """A trainable copy of the target's layer `source` (dots in names become underscores)."""
    prefix = f"model.layers.{source}."
    return nn.ParameterDict(
        {
            name.replace(".", "_"): nn.Parameter(target_weights[prefix + name].float().clone())
            for name in LAYER_NAMES
        }
    )


def register_target_tables(
    module: nn.Module,
    config: ModelConfig,
    target_weights: dict[str, torch.Tensor],
    head_token_ids: torch.Tensor | None,
) -> None:
    """The target's embeddings and LM head (its rows for head_token_ids) as frozen buffers `embed`, `head`."""
    embed = target_weights["model.embed_tokens.weight"].float()
    head = embed if config.tie_word_embeddings else target_weights["lm_head.weight"].float()
    if head_token_ids is not None:
        head = head.index_select(0, head_token_ids)
    module.register_buffer("embed", embed, persistent=False)
    module.register_buffer("head", head.contiguous(), persistent=False)


def qkv_projections(
    hidden: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's input norm and q, k, v projections: [B, L, heads, D] each, before rotary."""
    batch, length, _ = hidden.shape
    x = rms_norm(hidden, w["input_layernorm.weight"], cfg.rms_norm_eps)
    q = F.linear(x, w["self_attn.q_proj.weight"]).view(batch, length, cfg.num_heads, cfg.head_dim)
    k = F.linear(x, w["self_attn.k_proj.weight"]).view(batch, length, cfg.num_kv_heads, cfg.head_dim)
    v = F.linear(x, w["self_attn.v_proj.weight"]).view(batch, length, cfg.num_kv_heads, cfg.head_dim)
    return q, k, v


def layer_tail(
    hidden: torch.Tensor, attended: torch.Tensor, w: dict[str, torch.Tensor], eps: float
) -> torch.Tensor:
    """The rest of a layer after attention ([B, heads, L, D]): output projection and SiLU-gated MLP,
    each added to the residual stream."""
    batch, _, length, _ = attended.shape
    hidden = hidden + F.linear(
        attended.transpose(1, 2).reshape(batch, length, -1), w["self_attn.o_proj.weight"]
    )
    x = rms_norm(hidden, w["post_attention_layernorm.weight"], eps)
    gate = F.linear(x, w["mlp.gate_proj.weight"])
    up = F.linear(x, w["mlp.up_proj.weight"])
    return hidden + F.linear(F.silu(gate) * up, w["mlp.down_proj.weight"])


class DraftNetwork(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        target_weights: dict[str, torch.Tensor],
        source_layers: list[int],
        head_token_ids: torch.Tensor | None,
        max_positions: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.source_layers = source_layers
        self.layers = nn.ModuleList(layer_parameters(target_weights, source) for source in source_layers)
        self.norm = nn.Parameter(target_weights["model.norm.weight"].float().clone())
        register_target_tables(self, config, target_weights, head_token_ids)
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (right-padded) -> final hidden states [B, T, H]."""
        cfg = self.config
        batch, length = input_ids.shape
        hidden = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary.tables(torch.arange(length), hidden.dtype)  # [T, D/2]
        for layer in self.layers:
            w = {name: layer[name.replace(".", "_")] for name in LAYER_NAMES}
            q, k, v = qkv_projections(hidden, w, cfg)
            q, k = self.rotary.apply(q, k, cos, sin)
            attended = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            )
            hidden = layer_tail(hidden, attended, w, cfg.rms_norm_eps)
        return rms_norm(hidden, self.norm, cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head)

    def export(self) -> dict[str, torch.Tensor]:
        """Tensors for the draft file, named like a Llama checkpoint (layer i of the draft)."""
        out = {"model.norm.weight": self.norm.detach().clone()}
        for i, layer in enumerate(self.layers):
            for name in LAYER_NAMES:
                out[f"model.layers.{i}.{name}"] = layer[name.replace(".", "_")].detach().clone()
        return out
