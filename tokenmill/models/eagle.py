"""An EAGLE-style draft at run time: one decoder layer advancing the target's last hidden state by a token.

Input at position i: the target's final (normalised) hidden state there and the embedding of token i + 1,
joined by a linear layer; output: a guess of the target's hidden state at i + 1, which the target's own LM
head (restricted to the tokens the draft was trained on) turns into a token. To guess further, the guessed
state is fed back in. The maths is train/eagle_network.py's, on the serving layers and kernels.

Each sequence keeps a small dense KV cache for the draft's one layer (`EagleCache`): speculation runs only
while the batch is small, so paging would buy nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokenmill.layers.linear import Linear
from tokenmill.layers.norm import add_rms_norm, rms_norm
from tokenmill.models.llama import LlamaModel

EAGLE_FC_WEIGHT, EAGLE_FC_BIAS = "fc.weight", "fc.bias"  # names in the draft file


@dataclass
class EagleCache:
    """K/V of the draft's layer for positions [base, base + rows); grows by doubling."""

    base: int
    keys: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store K/V for positions [start, start + len(k)); returns the row count now in use (= end)."""
        begin = start - self.base
        end = begin + k.shape[0]
        if end > self.keys.shape[0]:
            capacity = max(64, 2 * end)
            grown_k = k.new_zeros(capacity, *k.shape[1:])
            grown_v = v.new_zeros(capacity, *v.shape[1:])
            if self.keys.numel():
                grown_k[: self.keys.shape[0]] = self.keys
                grown_v[: self.values.shape[0]] = self.values
            self.keys, self.values = grown_k, grown_v
        self.keys[begin:end] = k
        self.values[begin:end] = v
        return end


class EagleDraft:
    def __init__(
        self,
        model: LlamaModel,
        fc: Linear,
        head_token_ids: torch.Tensor | None,
        name: str,
    ) -> None:
        """`model` is a one-layer LlamaModel holding the draft's layer, final norm, embeddings and head."""
        self.model = model
        self.fc = fc
        self.head_token_ids = head_token_ids
        self.name = name

    @torch.inference_mode()
    def extend(
        self, cache: EagleCache, features: torch.Tensor, next_ids: torch.Tensor, start: int
    ) -> torch.Tensor:
        """features [n, H] at positions start..start+n-1, next_ids [n] the tokens one position later.
        Writes the layer's K/V for those positions and returns the guessed next hidden states [n, H]."""
        model = self.model
        cfg, layer = model.config, model.layers[0]
        eps = cfg.rms_norm_eps
        n = features.shape[0]
        x = self.fc(torch.cat([features, F.embedding(next_ids, model.embed)], dim=-1))
        cos, sin = model.rotary.tables(torch.arange(start, start + n), x.dtype)
        normed = rms_norm(x, layer.input_norm, eps)
        q, k, v = layer.qkv(normed).split([model.q_size, model.kv_size, model.kv_size], dim=-1)
        q = q.reshape(n, cfg.num_heads, cfg.head_dim)
        k = k.reshape(n, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(n, cfg.num_kv_heads, cfg.head_dim)
        q, k = model.rotary.apply(q, k, cos, sin)
        end = cache.write(start, k, v)
        keys = cache.keys[:end].transpose(0, 1)[None]
        values = cache.values[:end].transpose(0, 1)[None]
        mask = None
        if n > 1:  # row j sees the cache up to its own position
            mask = torch.arange(end).unsqueeze(0) <= torch.arange(end - n, end).unsqueeze(1)
        attended = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys, values, attn_mask=mask, scale=model.scale, enable_gqa=True
        )
        attended = attended[0].transpose(0, 1).reshape(n, model.q_size)
        x, normed = add_rms_norm(x, layer.o_proj(attended), layer.post_norm, eps)
        _, out = add_rms_norm(x, layer.down(layer.gate_up.silu_gate_up(normed)), model.norm, eps)
        return out

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)
