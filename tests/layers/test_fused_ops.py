"""The fused C++ ops (RMSNorm, residual add + RMSNorm, rotary in place, SiLU-and-multiply, row argmax)
compute what the PyTorch definitions do, including on the strided views the model hands them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels import kernels_available
from tokenmill.layers.norm import add_rms_norm, rms_norm, silu_mul
from tokenmill.layers.rotary import RotaryEmbedding, _rotate


def _reference_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("width", [96, 100])  # 100: a tail past the vector loop
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_rms_norm_and_residual_add_match_pytorch(tokens, width):
    torch.manual_seed(tokens)
    hidden, delta, weight = torch.randn(tokens, width), torch.randn(tokens, width), torch.randn(width)
    torch.testing.assert_close(rms_norm(hidden, weight, 1e-5), _reference_norm(hidden, weight, 1e-5))
    expected_hidden = hidden + delta
    new_hidden, normed = add_rms_norm(hidden.clone(), delta, weight, 1e-6)
    torch.testing.assert_close(new_hidden, expected_hidden)
    torch.testing.assert_close(normed, _reference_norm(expected_hidden, weight, 1e-6))


def test_silu_mul_matches_pytorch():
    gate_up = torch.randn(7, 2 * 48) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate) * up)


def test_rotary_in_place_on_views_of_the_fused_qkv_matches_pytorch():
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 5, 4, 2, 32
    rotary = RotaryEmbedding(dim, 64, 10000.0, None)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    cos, sin = rotary.tables(torch.tensor([0, 3, 7, 8, 63]), torch.float32)
    expected_q = _rotate(q.clone(), cos.unsqueeze(1), sin.unsqueeze(1), dim // 2)
    expected_k = _rotate(k.clone(), cos.unsqueeze(1), sin.unsqueeze(1), dim // 2)
    rotated_q, rotated_k = rotary.apply(q, k, cos, sin)
    torch.testing.assert_close(rotated_q, expected_q)
    torch.testing.assert_close(rotated_k, expected_k)


@pytest.mark.parametrize("shape", [(64, 49152), (3, 13), (1, 1)])
def test_argmax_rows_matches_torch_on_ties_infinities_and_nan(shape):
    assert kernels_available()  # builds and registers torch.ops.tokenmill
    torch.manual_seed(shape[1])
    x = torch.randn(*shape)
    if shape[0] >= 64:
        x[3, 100] = x[3, 200] = 50.0  # a tie: the first index wins
        x[5] = float("-inf")
        x[5, 7] = 1.0
        x[9, 5] = float("nan")  # NaN counts as the largest in torch
        x[10, -1] = 99.0  # the last column, past the vector loop's reach when V % 8 != 0
        x[11] = float("-inf")  # all -inf: index 0
        x[12, 0], x[12, 1] = -0.0, 0.0
        x[12, 2:] = -1.0
    assert torch.equal(torch.ops.tokenmill.argmax_rows(x), x.argmax(dim=-1))
