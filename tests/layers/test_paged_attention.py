"""Our attention kernels equal the PyTorch paths they replace: decode read straight from the paged cache
(against gather + SDPA), and prompts attending their own fresh K/V (against causal SDPA)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels import kernels_available
from tokenmill.layers.attention import (
    AttentionContext,
    PrefillSpan,
    dequantize_kv,
    kv_row_width,
    paged_attention,
    quantize_kv,
    write_kv_cache,
)


# Four sequences: one item per (sequence, KV head). Fewer (sequence, KV head) pairs than two per thread:
# one item per query head, sequences of different lengths side by side.
@pytest.mark.parametrize("lengths", [[1, 9, 37, 16], [300], [2], [130, 3]])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 32), (9, 3, 64), (2, 2, 20), (4, 1, 16)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
def test_paged_decode_kernel_matches_gather_and_sdpa(heads, kv_heads, dim, lengths, cache_dtype):
    assert kernels_available()
    torch.manual_seed(heads * dim)
    block_size, num_blocks = 8, 60

    def cache() -> torch.Tensor:
        rows = torch.randn(num_blocks * block_size, kv_heads, dim)
        return quantize_kv(rows) if cache_dtype == torch.int8 else rows.to(cache_dtype)

    k_cache, v_cache = cache(), cache()
    permutation = torch.randperm(num_blocks).tolist()  # blocks scattered over the pool
    tables, used = [], 0
    for length in lengths:
        count = -(-length // block_size)
        tables.append(permutation[used : used + count])
        used += count
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    batch = len(lengths)
    q = torch.randn(batch, heads, dim)
    k_new = torch.zeros(batch, kv_heads, dim)
    kernel_ctx = AttentionContext(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        num_decode=batch,
        decode_block_tables=block_tables,
        decode_lengths=torch.tensor(lengths),
        block_size=block_size,
    )
    gather = (block_tables.unsqueeze(-1) * block_size + torch.arange(block_size)).reshape(batch, -1)
    padding = torch.arange(gather.shape[1]) >= torch.tensor(lengths).unsqueeze(1)
    gather_ctx = AttentionContext(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        num_decode=batch,
        decode_gather=gather.reshape(-1),
        decode_bias=torch.zeros(padding.shape).masked_fill_(padding, float("-inf"))[:, None, None, :],
    )
    empty = k_new[:0]
    fast = paged_attention(q, empty, empty, k_cache, v_cache, kernel_ctx, dim**-0.5)
    reference = paged_attention(q, empty, empty, k_cache, v_cache, gather_ctx, dim**-0.5)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


# Spans of every shape the tiles meet: one row, fewer rows than a tile, a partial key tile, several 64-row
# blocks (items of one span on both threads); GQA groups of 1-4 and head sizes whose value columns end in a
# half tile.
@pytest.mark.parametrize("lengths", [[1], [5, 17, 130, 64, 65], [300], [7, 1, 33]])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 24), (8, 2, 128), (4, 1, 8)])
def test_prefill_kernel_matches_causal_sdpa(heads, kv_heads, dim, lengths):
    assert kernels_available()
    torch.manual_seed(heads * dim + len(lengths))
    tokens = sum(lengths)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)  # strided views, as the model passes them
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    spans = [PrefillSpan(start, start + length) for start, length in zip(starts, lengths, strict=True)]
    cache = torch.zeros(tokens, kv_heads, dim)

    def run(fresh_spans: torch.Tensor | None) -> torch.Tensor:
        ctx = AttentionContext(slot_mapping=torch.arange(tokens), prefills=spans, fresh_spans=fresh_spans)
        return paged_attention(q, k, v, cache.clone(), cache.clone(), ctx, dim**-0.5)

    fast = run(torch.tensor([[span.start, span.end] for span in spans]))
    torch.testing.assert_close(fast, run(None), atol=1e-5, rtol=1e-5)


def test_prefill_kernel_refuses_spans_outside_the_batch():
    assert kernels_available()
    q = torch.randn(4, 2, 8)
    for spans in ([[2, 5]], [[3, 3]], [[-1, 2]]):
        with pytest.raises(RuntimeError, match="outside"):
            torch.ops.tokenmill.prefill_attention_(torch.empty_like(q), q, q, q, torch.tensor(spans), 1.0)
    with pytest.raises(RuntimeError, match="multiple of eight"):
        x = torch.randn(4, 2, 12)
        torch.ops.tokenmill.prefill_attention_(torch.empty_like(x), x, x, x, torch.tensor([[0, 4]]), 1.0)


def test_block_table_pointing_outside_the_cache_is_refused():
    assert kernels_available()
    k_cache = torch.randn(16, 1, 8)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.tokenmill.paged_decode_attention(
            torch.randn(1, 1, 8), k_cache, k_cache.clone(), torch.tensor([[5]]), torch.tensor([3]), 8, 1.0
        )


def test_int8_kv_rows_round_trip_within_half_a_step():
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    x[0, 0] = 0.0  # an all-zero row keeps scale 0
    rows = quantize_kv(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, 3, 68)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((dequantize_kv(rows) - x).abs() <= step / 2 + 1e-6)
    assert torch.equal(dequantize_kv(rows[0, 0]), torch.zeros(64))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
def test_cache_write_kernel_stores_the_bytes_of_the_pytorch_path(cache_dtype):
    """k and v as the model hands them over: strided views of one fused QKV output."""
    assert kernels_available()
    torch.manual_seed(0)
    tokens, kv_heads, dim = 300, 3, 64
    qkv = torch.randn(tokens, 9 * dim + 2 * kv_heads * dim) * 3
    k = qkv[:, 9 * dim : 12 * dim].view(tokens, kv_heads, dim)
    v = qkv[:, 12 * dim :].view(tokens, kv_heads, dim)
    k[5] = 0  # a row without a largest value: scale 0
    # Values halfway between two int8 steps: their rounding turns on the last bit of 127 / largest, which
    # PyTorch computes as reciprocal(largest) * 127.
    largest = torch.rand(tokens, kv_heads, 1) * 10 + 0.1
    halves = (torch.arange(dim) - dim / 2 + 0.5) / 127 * largest
    halves[..., 0] = largest[..., 0]
    v.copy_(halves)
    slots = torch.randperm(1000)[:tokens]
    shape = (1000, kv_heads, kv_row_width(dim, cache_dtype))
    caches = [torch.zeros(shape, dtype=cache_dtype) for _ in range(4)]
    write_kv_cache(k, v, caches[0], caches[1], slots)
    caches[2].index_copy_(0, slots, quantize_kv(k) if cache_dtype == torch.int8 else k.to(cache_dtype))
    caches[3].index_copy_(0, slots, quantize_kv(v) if cache_dtype == torch.int8 else v.to(cache_dtype))
    assert torch.equal(caches[0].view(torch.int8), caches[2].view(torch.int8))
    assert torch.equal(caches[1].view(torch.int8), caches[3].view(torch.int8))
    with pytest.raises(RuntimeError, match="slot out of range"):
        write_kv_cache(k, v, caches[0], caches[1], slots + 1000)
