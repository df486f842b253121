"""The sampler's maths on fixed logits: distributions, truncation, penalties."""

import pytest
import torch

from tokenmill.errors import InvalidParameterError
from tokenmill.kernels import kernels_available
from tokenmill.layers.sampler import SamplingRow, sample, sampling_probabilities
from tokenmill.sampling import SamplingParams

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def _row(seed: int, **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), torch.Generator().manual_seed(seed), [], [], [])


def _frequencies(draws: int, **kw) -> torch.Tensor:
    counts = torch.zeros(LOGITS.shape[1])
    for seed in range(draws):
        token, _ = sample(LOGITS, [_row(seed, **kw)])
        counts[token[0]] += 1
    return counts / draws


def test_temperature_sampling_follows_softmax():
    freq = _frequencies(3000, temperature=1.0)
    expected = LOGITS[0].softmax(-1)
    assert (freq - expected).abs().max() < 0.03


def test_low_temperature_sharpens():
    assert _frequencies(400, temperature=0.1)[0] > 0.99


def test_top_k_top_p_min_p_exclude_the_tail():
    assert _frequencies(500, temperature=1.0, top_k=2)[2:].sum() == 0
    probs = LOGITS[0].softmax(-1)  # ~[0.56, 0.21, 0.13, 0.08, 0.03, 0.004]
    assert probs[:2].sum() < 0.8 < probs[:3].sum()
    assert _frequencies(500, temperature=1.0, top_p=0.8)[3:].sum() == 0
    assert _frequencies(500, temperature=1.0, min_p=0.2)[3:].sum() == 0  # 0.08 < 0.2 * 0.56


def _kept_by_full_sort(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The definitions, on one sort of the whole vocabulary."""
    probs = logits.softmax(-1)
    ordered, order = probs.sort(descending=True)
    keep = set()
    for rank, (p, token) in enumerate(zip(ordered.tolist(), order.tolist(), strict=True)):
        mass_before = float(ordered[:rank].sum())
        if rank == 0 or ((top_k == 0 or rank < top_k) and mass_before <= top_p and p >= min_p * ordered[0]):
            keep.add(token)
    return keep


def test_truncation_matches_a_full_sort_of_the_vocabulary():
    """Top-p widens its partial sort until the nucleus fits: a flat row needs thousands of tokens."""
    generator = torch.Generator().manual_seed(0)
    vocab = 6000
    logits = torch.randn(5, vocab, generator=generator) * torch.tensor([[4.0], [4.0], [0.05], [2.0], [3.0]])
    settings = [(0, 0.9, 0.0), (50, 0.95, 0.0), (0, 0.8, 0.0), (300, 1.0, 0.0), (0, 0.97, 0.05)]
    rows = [_row(i, temperature=1.0, top_k=k, top_p=p, min_p=m) for i, (k, p, m) in enumerate(settings)]
    probs = sampling_probabilities(logits, rows)
    assert len(_kept_by_full_sort(logits[2], 0, 0.8, 0.0)) > 1024  # beyond the first partial sorts
    for i, (k, p, m) in enumerate(settings):
        assert set(probs[i].nonzero().flatten().tolist()) == _kept_by_full_sort(logits[i], k, p, m)
        assert abs(float(probs[i].sum()) - 1.0) < 1e-5


def test_presence_and_frequency_penalties_follow_openai_formula():
    row = SamplingRow(
        SamplingParams(temperature=0, presence_penalty=0.7, frequency_penalty=0.8), None, [], [0, 0, 1], []
    )
    # token 0: 2.0 - 2*0.8 - 0.7 = -0.3; token 1: 1.0 - 0.8 - 0.7 = -0.5; token 2 keeps 0.5 and wins.
    assert sample(LOGITS, [row])[0] == [2]


def test_banned_tokens_are_never_chosen():
    row = SamplingRow(SamplingParams(temperature=0), None, [], [], [0, 1])
    assert sample(LOGITS, [row])[0] == [2]


def test_greedy_and_seeded_rows_in_one_batch_do_not_disturb_each_other():
    batch = LOGITS.repeat(3, 1)
    rows = [_row(5, temperature=1.0), SamplingRow(SamplingParams(temperature=0), None, [], [], []), _row(6)]
    together, _ = sample(batch, rows)
    assert together[1] == 0
    assert together[0] == sample(LOGITS, [_row(5, temperature=1.0)])[0][0]
    assert together[2] == sample(LOGITS, [_row(6)])[0][0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"temperature": -0.1},
        {"max_tokens": -1},
        {"max_tokens": 0},
        {"n": 0},
        {"top_k": -5},
        {"min_p": 2.0},
        {"logprobs": 100},
        {"stop": [""]},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 3.0},
        {"min_tokens": 10, "max_tokens": 5},
    ],
)
def test_invalid_parameters_raise_a_typed_error_naming_the_parameter(kwargs):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)
    assert info.value.param in kwargs
    assert "must" in str(info.value)


def test_sampling_kernel_takes_the_inverse_cdf_token():
    """Our fused sampler against float64 softmax + cumsum + searchsorted: the same token wherever the uniform
    is not within rounding of a boundary, never a token of weight zero, rows over many blocks of 256."""
    assert kernels_available()
    torch.manual_seed(3)
    logits = torch.randn(64, 3001) * 4
    logits[::3, ::7] = float("-inf")
    temps = torch.rand(64) * 1.7 + 0.3
    uniforms = torch.rand(64)
    uniforms[0], uniforms[1] = 0.0, 1 - 2**-24  # both ends of the distribution
    chosen = torch.ops.tokenmill.sample_rows(logits, temps, uniforms)
    probs = (logits.double() / temps.double()[:, None]).softmax(-1)
    cdf = probs.cumsum(-1)
    targets = uniforms.double() * cdf[:, -1]
    reference = torch.searchsorted(cdf, targets[:, None], right=True)[:, 0]
    for row in range(64):
        assert logits[row, chosen[row]] > float("-inf")
        if chosen[row] != reference[row]:  # only a boundary within float rounding of the target may differ
            gap = (cdf[row] - targets[row]).abs().min()
            assert gap < 1e-5, (row, int(chosen[row]), int(reference[row]), float(gap))
    assert (chosen == reference).float().mean() > 0.95


def test_sampling_kernel_hands_back_rows_it_cannot_take():
    assert kernels_available()
    logits = torch.zeros(3, 40)
    logits[0, 5] = float("nan")
    logits[1] = float("-inf")
    chosen = torch.ops.tokenmill.sample_rows(logits, torch.ones(3), torch.full((3,), 0.5))
    assert chosen[:2].tolist() == [-1, -1] and 0 <= chosen[2] < 40
    # sample() then takes such rows through PyTorch: an all -inf row still yields a token id
    tokens, _ = sample(logits[1:], [_row(0, temperature=1.0), _row(1, temperature=1.0)])
    assert len(tokens) == 2 and all(0 <= t < 40 for t in tokens)
