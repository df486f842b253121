"""RMSNorm (and the residual add fused before it), computed in fp32 as the reference models do.

The fused kernels (tokenmill.kernels) do in one op what PyTorch does in five or six; the PyTorch lines
below are the fallback and the definition.
"""

from __future__ import annotations

import torch

from tokenmill.kernels import kernels_available


def fusable(x: torch.Tensor) -> bool:
    """Whether the fused kernels take x: fp32 rows, no autograd, kernels built."""
    # The kernels have no backward: anything that trains (tokenmill draft train) takes the PyTorch path.
    plain = x.dim() == 2 and x.dtype == torch.float32 and x.stride(1) == 1 and not x.requires_grad
    return plain and kernels_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if fusable(x):
        return torch.ops.tokenmill.rms_norm(x, weight, eps)
    variance = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * weight


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, rms_norm(hidden + delta)); the kernel updates `hidden` in place."""
    if fusable(hidden) and hidden.is_contiguous() and delta.is_contiguous():
        normed = torch.ops.tokenmill.add_rms_norm_(hidden, delta, weight, eps)
        return hidden, normed
    hidden = hidden + delta
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return hidden, hidden * torch.rsqrt(variance + eps) * weight


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused [T, 2I] gate|up projection."""
    if fusable(gate_up) and gate_up.is_contiguous():
        return torch.ops.tokenmill.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
