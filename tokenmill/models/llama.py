"""The Llama family (llama, mistral, qwen2 with QKV bias, qwen3 with q/k norm) over a paged KV cache.

Weights are fused at load (Q|K|V in one matrix, gate|up in one) so each layer runs four matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.config import ModelConfig
from tokenmill.kernels import kernels_available
from tokenmill.layers.attention import AttentionContext, paged_attention
from tokenmill.layers.linear import (
    DENSE_KERNEL_MAX_ROWS,
    DenseLinear,
    Int4Linear,
    Int8GateUp,
    Int8Linear,
    Linear,
    make_gate_up,
    make_linear,
    residual_mlp,
)
from tokenmill.layers.norm import add_rms_norm, rms_norm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.weight_arena import pack_weights

_NO_COPIES = torch.empty(0, 2, dtype=torch.long)  # DecodeStack.run: no slot copies this step


@dataclass(slots=True)
class DecoderLayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear

    @property
    def linears(self) -> tuple[Linear, Linear, Linear, Linear]:
        """The layer's four matmuls in the order a step runs them."""
        return self.qkv, self.o_proj, self.gate_up, self.down


class LlamaModel:
    """Stateless apart from weights: the KV cache and attention metadata come in with every call."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        max_positions: int,
        quantization: str | None = None,
        group_size: int = 32,
    ) -> None:
        self.config = config
        self.quantization = quantization
        self.group_size = group_size
        self.embed = weights["model.embed_tokens.weight"]  # a lookup reads one row: fp32 costs nothing
        self.norm = weights["model.norm.weight"]
        head = self.embed if config.tie_word_embeddings else weights["lm_head.weight"]
        # The LM head is a fifth of SmolLM2's weights; int8 keeps it within noise, int4 costs 4x more NLL
        # (`tokenmill bench quality`), so an int4 model keeps an int8 head.
        self.lm_head = make_linear(head, None, "int8" if quantization else None)
        self.layers = [self._layer(weights, i) for i in range(config.num_layers)]
        self._pack_weights()
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self._decode_stack = self._build_decode_stack()

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
            qkv=self._linear(qkv, bias),
            q_norm=weights.get(attn + "q_norm.weight") if self.config.qk_norm else None,
            k_norm=weights.get(attn + "k_norm.weight") if self.config.qk_norm else None,
            o_proj=self._linear(weights[attn + "o_proj.weight"]),
            post_norm=weights[p + "post_attention_layernorm.weight"],
            gate_up=make_gate_up(gate_up, self.quantization, self.group_size),
            down=self._linear(weights[p + "mlp.down_proj.weight"]),
        )

    def _pack_weights(self) -> None:
        """Every matmul's weights back to back in one block, in the order a decode step reads them
        (models/weight_arena.py); a tied fp32 LM head keeps sharing its rows with the embedding."""
        tied = isinstance(self.lm_head, DenseLinear) and self.lm_head.weight is self.embed
        linears = self.linears
        for linear, view in zip(linears, pack_weights([linear.streamed for linear in linears]), strict=True):
            linear.streamed = view
        if tied:
            self.embed = self.lm_head.weight

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        return make_linear(weight, bias, self.quantization, self.group_size)

    def _build_decode_stack(self) -> torch.ScriptObject | None:
        """The C++ twin of `forward` for all-decode steps (kernels/cpu_decode.cpp), if this model fits it."""
        kernel_linears = all(linear.use_kernel for linear in self.linears)
        if not (kernels_available() and kernel_linears) or self.config.qk_norm:
            return None
        cfg = self.config
        stack = torch.classes.tokenmill.DecodeStack(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, self.scale, DENSE_KERNEL_MAX_ROWS
        )
        for layer in self.layers:
            for linear in layer.linears:
                stack.add_linear(*_stack_arguments(linear), linear.bias)
            stack.add_layer(layer.input_norm, layer.post_norm)
        return stack

    @property
    def linears(self) -> list[Linear]:
        """Every matmul a decode step runs, in order: each layer's four, then the LM head."""
        return [linear for layer in self.layers for linear in layer.linears] + [self.lm_head]

    @property
    def weight_bytes(self) -> int:
        """Bytes one decode step reads for the matmul weights (the roofline's numerator)."""
        return sum(linear.nbytes for linear in self.linears)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext,
        kv_cache: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: [layers, 2, slots, Hkv, kv_row_width(D)]; rows: the rows whose
        outputs the caller reads (None: all).

        Returns the final hidden states [T, H], or [len(rows), H] of those rows in that order. Past the last
        layer's attention, which still writes every row's keys and values, nothing mixes rows, so the rest of
        that layer (its output projection and MLP) runs on the given rows only: a prefill chunk samples only
        its last row (SmolLM2: ~3% of a prefill step's matmuls saved)."""
        cfg = self.config
        tokens = input_ids.shape[0]
        hidden = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary.tables(positions, hidden.dtype)
        eps = cfg.rms_norm_eps
        x = rms_norm(hidden, self.layers[0].input_norm, eps)
        all_decode = ctx.num_decode == tokens and ctx.decode_gather is None and not ctx.prefills
        if self._decode_stack is not None and all_decode:
            out = self._decode_stack.run(
                hidden,
                x,
                kv_cache,
                ctx.slot_mapping,
                ctx.decode_block_tables,
                ctx.decode_lengths,
                ctx.block_size,
                cos,
                sin,
                self.norm,
                ctx.slot_copies if ctx.slot_copies is not None else _NO_COPIES,
            )
            return out if rows is None else out[rows]
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(x)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(tokens, cfg.num_heads, cfg.head_dim)
            k = k.view(tokens, cfg.num_kv_heads, cfg.head_dim)
            v = v.view(tokens, cfg.num_kv_heads, cfg.head_dim)
            if layer.q_norm is not None:
                q = rms_norm(q, layer.q_norm, eps)
                k = rms_norm(k, layer.k_norm, eps)
            q, k = self.rotary.apply(q, k, cos, sin)
            attended = paged_attention(q, k, v, kv_cache[index, 0], kv_cache[index, 1], ctx, self.scale)
            if rows is not None and index == len(self.layers) - 1:
                attended, hidden, tokens = attended[rows], hidden[rows], len(rows)
            out = layer.o_proj(attended.reshape(tokens, self.q_size))
            hidden, mlp = residual_mlp(hidden, out, layer.post_norm, eps, layer.gate_up, layer.down)
            # The next layer's input norm (or the final norm) runs fused with this residual add.
            next_norm = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.norm
            hidden, x = add_rms_norm(hidden, mlp, next_norm, eps)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Each row's most likely next token (the first on ties) where the LM head finds it without writing
        the logits; None where it cannot (the caller then samples from compute_logits)."""
        return self.lm_head.argmax(hidden)


def _stack_arguments(linear: Linear) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """(format, tensors, rows) as DecodeStack.add_linear takes them; an unused slot holds an empty tensor."""
    empty = torch.empty(0)
    if isinstance(linear, Int8GateUp):  # a layer's gate_up: returns silu(gate) * up
        return 3, linear.quantized.units, linear.quantized.scales, 0
    if isinstance(linear, Int8Linear):
        return 1, linear.quantized.units, linear.quantized.scales, 0
    if isinstance(linear, Int4Linear):
        return 2, linear.quantized.blocks, empty, linear.quantized.rows
    assert isinstance(linear, DenseLinear)
    return 0, linear.weight, empty, 0
