"""Weight quantisation formats: int8 per output channel, int4 in groups along the input dimension.

Dequantisation is one multiply(-add). int8 is symmetric (w = q * s, fp32 s): one scale per row is enough at
8 bits. int4 is asymmetric per group (w = q * s + min, q in 0..15, s and min in fp16), the format of GGUF's
Q4_1, so re-quantising a Q4_1 model loses nothing, and a group of 32 tracks local ranges a row scale
cannot. fp16 scale and minimum: 4 bytes per 32 weights instead of 8, 0.625 bytes per weight instead of 0.75,
which a memory-bound decode step reads 17% faster (rounding them costs nothing measurable: see
`tokenmill bench quality`).

Both are stored the way their kernels read them (`Int8Weight`, `Int4Weight`): output rows side by side in
panels (16 for int8, 8 for int4), so that the outputs of a panel are the lanes of one vector, and each panel's
weights (and int4's scales and minimums) are one sequential stream. The kernels then need no horizontal sums
and no repacking, at one row or a thousand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import INT4_GROUP_SIZES

# int8 storage, as its kernel reads it: panels of INT8_PANEL output rows; per panel and block of 32 inputs,
# one INT8_UNIT-byte unit of eight 64-byte vectors, vector j holding row r's weights 4j .. 4j + 3 at bytes
# 4r .. 4r + 3, each as w + 128 (the unsigned operand vpdpbusd takes). One fp32 scale per output row
# beside them.
INT8_PANEL = 16
INT8_UNIT = 512


@dataclass(slots=True)
class Int8Weight:
    units: torch.Tensor  # uint8 [ceil(N / 16), K / 32, 512]; rows past N are zero (stored 128)
    scales: torch.Tensor  # fp32 [N]

    @property
    def nbytes(self) -> int:
        return self.units.nbytes + self.scales.nbytes

    @property
    def in_features(self) -> int:
        return self.units.shape[1] * 32


# int4 storage: panels of INT4_PANEL output rows; per panel and block of 32 inputs, one INT4_UNIT-byte unit:
# four 32-byte vectors (vector j holds row r's packed bytes 4j .. 4j + 3 at bytes 4r .. 4r + 3, a packed byte
# i being weights i and i + 16 in its low and high nibble), then the eight rows' fp16 scales, then their
# eight fp16 minimums. Scales repeat per block when the group is longer than 32.
INT4_PANEL = 8
INT4_UNIT = 160


@dataclass(slots=True)
class Int4Weight:
    blocks: torch.Tensor  # uint8 [ceil(N / 8), K / 32, 160]; rows past N are zero
    rows: int  # N

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    @property
    def in_features(self) -> int:
        return self.blocks.shape[1] * 32


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    rows, cols = weight.shape
    if cols % 32:
        raise ValueError(f"int8 weights need a row length divisible by 32, not {cols}")
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    panels = -(-rows // INT8_PANEL)
    if panels * INT8_PANEL != rows:
        q = torch.cat([q, q.new_zeros(panels * INT8_PANEL - rows, cols)])
    units = (q.to(torch.int16) + 128).to(torch.uint8).reshape(panels, INT8_PANEL, cols // 32, 8, 4)
    units = units.permute(0, 2, 3, 1, 4)
    return Int8Weight(units.reshape(panels, cols // 32, INT8_UNIT).contiguous(), scales.contiguous())


def pair_gate_up_rows(rows: int) -> torch.Tensor:
    """The row order that puts a gate|up weight's [2I, K] gate panel p beside up panel p (I a multiple of
    INT8_PANEL): one tile then holds both halves of sixteen SiLU-gated outputs (cpu_linear.cpp's
    int8_silu_gate_up)."""
    half = rows // 2
    if rows % 2 or half % INT8_PANEL:
        raise ValueError(f"gate|up pairing needs 2 x a multiple of {INT8_PANEL} rows, not {rows}")
    return torch.arange(rows).view(2, half // INT8_PANEL, INT8_PANEL).transpose(0, 1).reshape(-1)


def dequantize_int8(weight: Int8Weight) -> torch.Tensor:
    panels, blocks, _ = weight.units.shape
    q = weight.units.reshape(panels, blocks, 8, INT8_PANEL, 4).permute(0, 3, 1, 2, 4)
    rows = weight.scales.numel()
    q = q.reshape(panels * INT8_PANEL, blocks * 32)[:rows].float() - 128.0
    return q * weight.scales[:, None]


_FP16_MAX = torch.finfo(torch.float16).max
_FP16_TINY = 2.0**-24  # the smallest positive fp16: a constant group's scale


def quantize_int4(weight: torch.Tensor, group: int = 32) -> Int4Weight:
    rows, cols = weight.shape
    if group not in INT4_GROUP_SIZES or cols % group:
        raise ValueError(f"int4 group must be one of {INT4_GROUP_SIZES} and divide the row length {cols}")
    grouped = weight.float().reshape(rows, cols // group, group)
    # Rounded to fp16 first, so the 4-bit values are chosen against the scale and minimum as stored.
    low = grouped.amin(dim=2).clamp(-_FP16_MAX, _FP16_MAX).half()
    high = grouped.amax(dim=2)
    scales = ((high - low.float()) / 15.0).clamp(_FP16_TINY, _FP16_MAX).half()
    q = (
        torch.round((grouped - low.float()[..., None]) / scales.float()[..., None])
        .clamp(0, 15)
        .to(torch.uint8)
    )
    per_block = group // 32
    return _pack_int4(
        q.reshape(rows, cols // 32, 32),
        scales.repeat_interleave(per_block, dim=1),
        low.repeat_interleave(per_block, dim=1),
    )


def _pack_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> Int4Weight:
    """q [N, K / 32, 32] in 0..15, scales and mins fp16 [N, K / 32] -> the panel layout (see INT4_UNIT)."""
    rows, blocks, _ = q.shape
    padded = -(-rows // INT4_PANEL) * INT4_PANEL
    if padded != rows:
        q = torch.cat([q, q.new_zeros(padded - rows, blocks, 32)])
        scales = torch.cat([scales, scales.new_zeros(padded - rows, blocks)])
        mins = torch.cat([mins, mins.new_zeros(padded - rows, blocks)])
    panels = padded // INT4_PANEL
    packed = q[..., :16] | (q[..., 16:] << 4)  # [N, blocks, 16]
    weights = packed.reshape(panels, INT4_PANEL, blocks, 4, 4).permute(0, 2, 3, 1, 4)

    def side_by_side(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(panels, INT4_PANEL, blocks).transpose(1, 2).contiguous().view(torch.uint8)

    units = torch.cat([weights.reshape(panels, blocks, 128), side_by_side(scales), side_by_side(mins)], dim=2)
    return Int4Weight(units.contiguous(), rows)


def round_activations_int8_groups(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 and int4 kernels see it: int8 per 32 values (scale = their largest |x| / 127), in fp32.

    Byte weights times byte activations is one vpdpbusd per 32 products (cpu_linear.cpp); groups of 32 keep
    an outlier from flattening the rest of its row, as in llama.cpp's Q8 blocks.
    """
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    largest = groups.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    return (torch.round(groups * inverse) * (largest / 127.0)).reshape(x.shape)


def dequantize_int4(weight: Int4Weight) -> torch.Tensor:
    panels, blocks, _ = weight.blocks.shape
    units = weight.blocks
    packed = units[..., :128].reshape(panels, blocks, 4, INT4_PANEL, 4).permute(0, 3, 1, 2, 4)
    packed = packed.reshape(panels * INT4_PANEL, blocks, 16)
    q = torch.cat([packed & 0x0F, packed >> 4], dim=2).float()

    def per_row(values: torch.Tensor) -> torch.Tensor:
        halves = values.contiguous().view(torch.float16).float()  # [panels, blocks, 8]
        return halves.transpose(1, 2).reshape(panels * INT4_PANEL, blocks, 1)

    values = q * per_row(units[..., 128:144]) + per_row(units[..., 144:160])
    return values.reshape(panels * INT4_PANEL, blocks * 32)[: weight.rows]
