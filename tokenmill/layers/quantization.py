"""Weight quantisation formats: int8 per output channel, int4 in groups along the input dimension.

Dequantisation is one multiply(-add). int8 is symmetric (w = q * s, fp32 s): one scale per row is enough at
8 bits. int4 is asymmetric per group (w = q * s + min, q in 0..15, s and min in fp16), the format of GGUF's
Q4_1, so re-quantising a Q4_1 model loses nothing, and a group of 32 tracks local ranges a row scale
cannot. fp16 scale and minimum: 4 bytes per 32 weights instead of 8, 0.625 bytes per weight instead of 0.75,
which a memory-bound decode step reads 17% faster (rounding them costs nothing measurable: see
`tokenmill bench quality`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import INT4_GROUP_SIZES


@dataclass(slots=True)
class Int8Weight:
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # fp32 [N]

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]


@dataclass(slots=True)
class Int4Weight:
    packed: torch.Tensor  # uint8 [N, K / 2]; per 32 weights: byte j = w[j] | w[j + 16] << 4
    scales: torch.Tensor  # fp16 [N, K / group]
    mins: torch.Tensor  # fp16 [N, K / group]
    group: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.mins.nbytes

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    qweight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(qweight.contiguous(), scales.contiguous())


def dequantize_int8(weight: Int8Weight) -> torch.Tensor:
    return weight.qweight.float() * weight.scales[:, None]


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
    q = q.reshape(rows, cols // 32, 2, 16)
    packed = q[:, :, 0, :] | (q[:, :, 1, :] << 4)
    return Int4Weight(
        packed.reshape(rows, cols // 2).contiguous(), scales.contiguous(), low.contiguous(), group
    )


def round_activations_int16(x: torch.Tensor) -> torch.Tensor:
    """x as the decode kernels see it: int16 per row (scale = the row's largest |x| / 32767), back in fp32.

    The kernels for one or two rows multiply int16 activations by integer weights (see cpu_linear.cpp);
    the fallback rounds the same way so both paths give the same numbers.
    """
    largest = x.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, 32767.0 / largest, torch.zeros_like(largest))
    return torch.round(x * inverse) * (largest / 32767.0)


def round_activations_int8_groups(x: torch.Tensor) -> torch.Tensor:
    """x as the int4 decode kernel sees it: int8 per 32 values (scale = their largest |x| / 127), in fp32.

    Unsigned 4-bit weights times signed 8-bit activations is one vpmaddubsw per 32 pairs (cpu_linear.cpp);
    groups of 32 keep an outlier from flattening the rest of its row, as in llama.cpp's Q8 blocks.
    """
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    largest = groups.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    return (torch.round(groups * inverse) * (largest / 127.0)).reshape(x.shape)


def dequantize_int4(weight: Int4Weight) -> torch.Tensor:
    rows = weight.packed.shape[0]
    cols = weight.packed.shape[1] * 2
    packed = weight.packed.reshape(rows, cols // 32, 1, 16)
    q = torch.cat([packed & 0x0F, packed >> 4], dim=2).reshape(rows, cols // weight.group, weight.group)
    values = q.float() * weight.scales.float()[..., None] + weight.mins.float()[..., None]
    return values.reshape(rows, cols)
