"""Linear layers behind one call signature, so a quantised kind can replace the dense one per weight.

- DenseLinear: fp32 weights. Batches up to 256 rows go through our AVX2 kernel, which streams the weights
  at close to memory bandwidth and matches MKL up to 256 rows; MKL takes larger prefill chunks.
- Int8Linear / Int4Linear: quantised weights, 4x and ~6x fewer bytes per decode step. The products run on
  integer units, so the kernels round activations: both formats meet activations rounded to int8 in groups
  of 32 (llama.cpp's Q8 blocks), at every row count, so that a sequence's tokens do not depend on its
  neighbours in the batch. The perplexity bounds hold. (int8 met int16 activations, one scale per row, until
  session 12: byte products run twice as many per instruction, and a batch of 64 ran its int8 matmuls
  ~1.6x faster.) fbgemm's dynamic int8 (int8 activations, one scale per tensor) was measured
  on SmolLM2 and rejected: +41% NLL on a 1k-token text, mostly from down_proj.
Without the compiled kernels (see tokenmill.kernels) the quantised layers dequantise, round activations as
the kernels do, and call F.linear: the same numbers, slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels import kernels_available
from tokenmill.layers.norm import add_rms_norm, fusable, silu_mul
from tokenmill.layers.quantization import (
    INT8_PANEL,
    Int4Weight,
    Int8Weight,
    dequantize_int4,
    dequantize_int8,
    pair_gate_up_rows,
    quantize_int4,
    quantize_int8,
    round_activations_int8_groups,
)

# Up to this many rows our kernel matches or beats MKL's sgemm on two threads (measured 1-256 rows);
# MKL's small-batch sgemm also stalls when another process holds a core. Above it, MKL.
DENSE_KERNEL_MAX_ROWS = 256


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight.contiguous()
        self.bias = bias
        rows, cols = weight.shape
        self.use_kernel = (
            weight.dtype == torch.float32 and rows % 4 == 0 and cols % 8 == 0 and kernels_available()
        )

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    @property
    def streamed(self) -> torch.Tensor:
        """The tensor a matmul reads end to end (models/weight_arena.py places it)."""
        return self.weight

    @streamed.setter
    def streamed(self, tensor: torch.Tensor) -> None:
        self.weight = tensor

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and x.dim() == 2 and x.shape[0] <= DENSE_KERNEL_MAX_ROWS:
            y = torch.ops.tokenmill.fp32_linear(x, self.weight)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def silu_gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a gate|up projection (rows: gate, then up)."""
        return silu_mul(self(x))

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's index of its largest output without the outputs written out; None: no kernel for it."""
        return None


class _QuantizedLinear:
    """The shared call path: our kernel on [rows, K], or dequantise + F.linear (same numbers, slower)."""

    quantized: Int8Weight | Int4Weight
    bias: torch.Tensor | None
    use_kernel: bool

    @property
    def nbytes(self) -> int:
        return self.quantized.nbytes

    @property
    def streamed(self) -> torch.Tensor:
        """The tensor a matmul reads end to end (models/weight_arena.py places it)."""
        return self.quantized.units if isinstance(self.quantized, Int8Weight) else self.quantized.blocks

    @streamed.setter
    def streamed(self, tensor: torch.Tensor) -> None:
        if isinstance(self.quantized, Int8Weight):
            self.quantized.units = tensor
        else:
            self.quantized.blocks = tensor

    @property
    def in_features(self) -> int:
        return self.quantized.in_features

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        """x as the kernel multiplies it (see the subclasses)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_kernel:
            return F.linear(self._round(x), self._dequantize(), self.bias)
        y = self._kernel(_flat(x)).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def silu_gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a gate|up projection (rows: gate, then up)."""
        return silu_mul(self(x))

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's index of its largest output without the outputs written out; None: no kernel for it."""
        return None


class Int8Linear(_QuantizedLinear):
    """Per-output-channel symmetric int8 weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.quantized = quantize_int8(weight)
        self.bias = bias
        self.use_kernel = kernels_available()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenmill.int8_linear(x, self.quantized.units, self.quantized.scales)

    def _dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.quantized)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return round_activations_int8_groups(x)  # at every row count, as the kernel does

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [rows, K] -> each row's index of its largest output, the first on ties, as self(x).argmax(-1).
        An LM head's greedy rows need only that: the kernel keeps each chunk of outputs in L2 instead of
        writing the [rows, vocab] logits and reading them back (12.6 MB at batch 64)."""
        if not self.use_kernel or self.bias is not None or x.dim() != 2:
            return None
        ids = torch.ops.tokenmill.int8_linear_argmax(
            x.contiguous(), self.quantized.units, self.quantized.scales
        )
        left = (ids < 0).nonzero().flatten()  # NaN rows, or none above -inf: as torch.argmax takes them
        if len(left):
            ids[left] = self(x[left]).argmax(dim=-1)
        return ids


class Int8GateUp(Int8Linear):
    """An MLP's gate|up projection in int8 that returns silu(gate) * up, [..., I]: the kernel applies SiLU to
    each tile's outputs while they are in cache, so the [T, 2I] product never goes to memory and back. The
    rows are stored with gate and up panels paired (pair_gate_up_rows). SmolLM2's 30 gate|up + down pairs,
    cold: 64 rows 23.0 -> 21.9 ms, 1,024 rows 318 -> 302 ms (the SiLU pass and the wide product's traffic
    gone)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight[pair_gate_up_rows(weight.shape[0])])

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenmill.int8_silu_gate_up(x, self.quantized.units, self.quantized.scales)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            return self._kernel(_flat(x)).view(*x.shape[:-1], -1)
        paired = F.linear(self._round(x), self._dequantize()).unflatten(-1, (-1, 2, INT8_PANEL))
        gate, up = paired[..., 0, :].flatten(-2), paired[..., 1, :].flatten(-2)
        return F.silu(gate) * up

    def silu_gate_up(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        return None  # its rows are stored paired, and it returns silu(gate) * up


class Int4Linear(_QuantizedLinear):
    """Group-wise asymmetric int4 weights (GGUF Q4_1's format)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group: int = 32) -> None:
        self.quantized = quantize_int4(weight, group)
        self.bias = bias
        self.use_kernel = kernels_available()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenmill.int4_linear(x, self.quantized.blocks, self.quantized.rows)

    def _dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.quantized)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return round_activations_int8_groups(x)  # at every row count, as the kernel does


Linear = DenseLinear | Int8Linear | Int4Linear


def residual_mlp(
    hidden: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor, eps: float, gate_up: Linear, down: Linear
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, down(silu(gate) * up) of RMSNorm(hidden + delta)): a decoder layer's residual add and
    MLP. With int8 gate|up and down weights one kernel call (int8_mlp_) returns the same numbers bit for bit:
    the normed rows and the [T, I] product are rounded to int8 while in cache instead of written out in fp32
    and read back (a 1,024-token prefill chunk's product is 6 MB)."""
    fused = (
        isinstance(gate_up, Int8GateUp)
        and type(down) is Int8Linear
        and gate_up.use_kernel
        and down.use_kernel
        and down.bias is None
        and fusable(hidden)
        and hidden.is_contiguous()
        and delta.is_contiguous()
    )
    if not fused:
        hidden, x = add_rms_norm(hidden, delta, norm, eps)
        return hidden, down(gate_up.silu_gate_up(x))
    mlp = torch.ops.tokenmill.int8_mlp_(
        hidden,
        delta,
        norm,
        eps,
        gate_up.quantized.units,
        gate_up.quantized.scales,
        down.quantized.units,
        down.quantized.scales,
    )
    return hidden, mlp


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quantization: str | None, group_size: int = 32
) -> Linear:
    """A layer of the requested format; a weight the format cannot hold (odd shapes) stays dense."""
    rows, cols = weight.shape
    if quantization == "int8" and cols % 32 == 0:
        return Int8Linear(weight, bias)
    if quantization == "int4" and cols % group_size == 0:
        return Int4Linear(weight, bias, group_size)
    return DenseLinear(weight, bias)


def make_gate_up(weight: torch.Tensor, quantization: str | None, group_size: int = 32) -> Linear:
    """An MLP's gate|up projection [2I, K]; call its silu_gate_up. int8 fuses the SiLU where the shape
    allows (I a multiple of 16)."""
    rows, cols = weight.shape
    if quantization == "int8" and cols % 32 == 0 and rows % (2 * INT8_PANEL) == 0:
        return Int8GateUp(weight)
    return make_linear(weight, None, quantization, group_size)
