"""Paged attention: write new K/V into cache slots, then attend prefill spans and batched decodes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokenmill.kernels import kernels_available


@dataclass(slots=True)
class PrefillSpan:
    """Rows [start, end) of the flat batch belong to one sequence whose context is `context_len` long.

    `gather` holds the cache slots of the whole context when part of it was computed earlier (chunked
    prefill, prefix-cache hit); None means the span is the whole context and attends its own fresh K/V.
    """

    start: int
    end: int
    gather: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass(slots=True)
class AttentionContext:
    """Per-step attention metadata, built once by the runner and shared by every layer."""

    slot_mapping: torch.Tensor
    num_decode: int = 0
    # Decode rows read the cache either through our kernel (block tables + lengths, no copies) or, without
    # it, through padded gathers and a mask for SDPA.
    decode_block_tables: torch.Tensor | None = None  # [B, W] block ids, padded with 0
    decode_lengths: torch.Tensor | None = None  # [B] context length including the current token
    block_size: int = 16
    decode_gather: torch.Tensor | None = None  # [B * S] cache slots, each row padded to S
    decode_bias: torch.Tensor | None = None  # [B, 1, 1, S] 0 where the key is real, -inf on padding
    prefills: list[PrefillSpan] = field(default_factory=list)
    # [S, 2] (start, end) of the prefills without `gather`, when our causal kernel attends them (one call).
    fresh_spans: torch.Tensor | None = None
    # [E, 2] cache slots: once this step's K/V are written, slot [e, 0] is copied to slot [e, 1] (a branch
    # candidate's scratch block needs its parent token's K/V, made in the same step; engine/runner.py).
    slot_copies: torch.Tensor | None = None


# An int8 KV cache row is one token's one head: D values rounded to int8 with one scale (the largest |value|
# / 127), the scale's fp32 bits in the row's last four bytes. Rows stay whole slots of the cache, so block
# copies and prefix sharing move them as they move fp16 or fp32 rows. 68 bytes per row at D = 64
# against fp16's 128: decode attention reads half the bytes.
KV_SCALE_BYTES = 4


def kv_row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements per (token, head) row of a KV cache of this dtype."""
    return head_dim + KV_SCALE_BYTES if dtype == torch.int8 else head_dim


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """[..., D] fp32 -> [..., D + 4] int8 rows; the C++ decode step rounds its rows the same way."""
    largest = x.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    values = (x * inverse).round_().clamp_(-127, 127).to(torch.int8)
    scale_bytes = (largest / 127.0).reshape(-1).view(torch.int8).reshape(*x.shape[:-1], KV_SCALE_BYTES)
    return torch.cat([values, scale_bytes], dim=-1)


def dequantize_kv(rows: torch.Tensor) -> torch.Tensor:
    """[..., D + 4] int8 rows -> [..., D] fp32."""
    width = rows.shape[-1] - KV_SCALE_BYTES
    return rows[..., :width].float() * rows[..., width:].contiguous().view(torch.float32)


def _to_cache(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    return quantize_kv(x.float()) if cache.dtype == torch.int8 else x.to(cache.dtype)  # rounded if narrower


def _from_cache(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_kv(rows).to(dtype) if rows.dtype == torch.int8 else rows.to(dtype)


def _query_for(q: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """The query as it meets the cache: against int8 keys it is rounded to int8 too, one scale per head, as
    the decode kernel rounds it (its scores are then integer dot products, scaled once)."""
    return dequantize_kv(quantize_kv(q.float())).to(q.dtype) if cache.dtype == torch.int8 else q


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """k, v [T, Hkv, D] into cache rows `slots`, rounded to the cache's dtype."""
    if (
        kernels_available()
        and k.dtype == v.dtype == torch.float32
        and k.stride(-1) == v.stride(-1) == 1
        and k.stride(1) == v.stride(1) == k.shape[-1]
        and k.stride(0) == v.stride(0)
    ):
        torch.ops.tokenmill.write_kv_cache_(k, v, k_cache, v_cache, slots)  # one pass, same bytes
        return
    k_cache.index_copy_(0, slots, _to_cache(k, k_cache))
    v_cache.index_copy_(0, slots, _to_cache(v, v_cache))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: AttentionContext,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D]; caches: [num_slots, Hkv, kv_row_width(D)]. Returns [T, Hq, D]."""
    write_kv_cache(k, v, k_cache, v_cache, ctx.slot_mapping)
    if ctx.slot_copies is not None:
        sources, targets = ctx.slot_copies[:, 0], ctx.slot_copies[:, 1]
        k_cache[targets] = k_cache[sources]
        v_cache[targets] = v_cache[sources]
    out = torch.empty_like(q)
    if ctx.num_decode and ctx.decode_gather is None:
        out[: ctx.num_decode] = torch.ops.tokenmill.paged_decode_attention(
            q[: ctx.num_decode],
            k_cache,
            v_cache,
            ctx.decode_block_tables,
            ctx.decode_lengths,
            ctx.block_size,
            scale,
        )
    elif ctx.num_decode:
        b = ctx.num_decode
        shape = (b, -1, k_cache.shape[1], q.shape[-1])
        # index_select on the slot dim is several times faster than advanced indexing here.
        keys = (
            _from_cache(k_cache.index_select(0, ctx.decode_gather), q.dtype).view(shape).transpose(1, 2)
        )  # [B, Hkv, S, D]
        values = _from_cache(v_cache.index_select(0, ctx.decode_gather), q.dtype).view(shape).transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            _query_for(q[:b], k_cache).unsqueeze(2),
            keys,
            values,
            attn_mask=ctx.decode_bias,
            scale=scale,
            enable_gqa=True,
        )
        out[:b] = attended.squeeze(2)
    # Prompts over their own fresh K/V: our causal kernel, all of them in one call (~4x SDPA's speed).
    if ctx.fresh_spans is not None:
        torch.ops.tokenmill.prefill_attention_(out, q, k, v, ctx.fresh_spans, scale)
    # The other prefill spans go to SDPA as 4-D [1, H, L, D]: with 3-D inputs PyTorch takes its unfused
    # "math" path, 2-4x slower than the fused CPU kernel it picks for 4-D (measured: 128 tokens 0.62 ->
    # 0.34 ms, 1024 tokens 58 -> 13 ms).
    for span in ctx.prefills:
        if span.gather is None and ctx.fresh_spans is not None:
            continue
        query = q[span.start : span.end].transpose(0, 1)[None]  # [1, Hq, L, D]
        if span.gather is None:
            keys = k[span.start : span.end].transpose(0, 1)[None]
            values = v[span.start : span.end].transpose(0, 1)[None]
            attended = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            # [1, Hkv, C, D]
            keys = _from_cache(k_cache.index_select(0, span.gather), q.dtype).transpose(0, 1)[None]
            values = _from_cache(v_cache.index_select(0, span.gather), q.dtype).transpose(0, 1)[None]
            attended = F.scaled_dot_product_attention(
                _query_for(query, k_cache), keys, values, attn_mask=span.mask, scale=scale, enable_gqa=True
            )
        out[span.start : span.end] = attended[0].transpose(0, 1)
    return out
