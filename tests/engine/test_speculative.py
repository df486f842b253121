"""Speculative decoding: greedy output unchanged, sampled distribution unchanged, KV rolled back."""

import pytest
import torch

from tests.conftest import assert_no_leak, make_engine, run_to_completion
from tokenmill.engine.speculative import DraftProposal, NgramProposer, Proposer, SpeculativeConfig
from tokenmill.errors import InvalidParameterError
from tokenmill.layers.attention import AttentionContext, PrefillSpan
from tokenmill.layers.sampler import SamplingRow, verify_draft
from tokenmill.models.loader import load_model
from tokenmill.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def test_ngram_proposer_continues_the_latest_match():
    proposer = NgramProposer(SpeculativeConfig("ngram", k=3, max_ngram=2, min_ngram=1))
    assert proposer.lookup([1, 2, 3, 4, 9, 1, 2, 7, 8, 1, 2], 3) == [7, 8, 1]
    assert proposer.lookup([5, 6, 7], 3) == []
    assert proposer.lookup([4, 4], 2) == [4]


def test_speculative_config_parsing_and_errors():
    config = SpeculativeConfig.parse("ngram:k=5,max_ngram=4")
    assert (config.method, config.k, config.max_ngram) == ("ngram", 5, 4)
    assert config.max_batch == max(1, config.crossover_tokens // 6)
    for bad in ("draft", "draft=", "ngram:k=0", "ngram:q=3", "ngram:k=x", "draft=m.safetensors,max_ngram=2"):
        with pytest.raises(InvalidParameterError):
            SpeculativeConfig.parse(bad)


def _repetitive_prompts(vocab: int) -> list[list[int]]:
    motif = [11, 57, 302, 99, 4000, 12]
    return [motif * 6, list(range(50, 90)) + motif * 3, [7] * 20, list(range(200, 213)) * 3]


def _run(engine, prompts, params):
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done = run_to_completion(engine)
    return [done[str(i)].outputs[0].token_ids for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_speculative_output_equals_plain_output(tiny_models, arch):
    loaded = load_model(str(tiny_models[arch][0]))
    prompts = _repetitive_prompts(loaded.config.vocab_size)
    plain = _run(make_engine(loaded), prompts, GREEDY)
    engine = make_engine(loaded, speculative="ngram:k=4,crossover_tokens=1000", block_size=8)
    assert _run(engine, prompts, GREEDY) == plain
    assert engine.stats.spec_draft_tokens > 0
    assert_no_leak(engine)


def test_speculative_on_smollm_rewrite_task(smollm_loaded):
    tokenizer = smollm_loaded.tokenizer
    passage = "The river runs past the old mill, turning its wheel day and night. " * 3
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat exactly:\n" + passage}])
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = _run(make_engine(smollm_loaded), [prompt], params)
    engine = make_engine(smollm_loaded, speculative="ngram:k=4")
    assert _run(engine, [prompt], params) == plain
    assert engine.stats.spec_accepted_tokens > 0 and engine.stats.spec_mean_accepted_length > 1.0
    assert_no_leak(engine)


class FixedProposer(Proposer):
    """Guesses the same tokens every time: the verifier, not the guesser, is under test here."""

    def __init__(self, guess: list[int]) -> None:
        self.guess = guess

    def propose(self, seqs, num_tokens):
        return [DraftProposal(self.guess[:k]) for k in num_tokens]


def test_rejection_rule_keeps_the_target_distribution():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5], [0.2, 0.1, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    row = SamplingRow(SamplingParams(temperature=1.0), None, [], [], [])
    firsts = []
    for seed in range(4000):
        row.generator = torch.Generator().manual_seed(seed)
        firsts.append(verify_draft(logits, [1, 3], row)[0])
    frequencies = torch.bincount(torch.tensor(firsts), minlength=4).double() / len(firsts)
    assert (frequencies - logits[0].double().softmax(-1)).abs().max() < 0.025


def _temperature_for_top_probability(loaded, prompt: list[int], target: float) -> float:
    """A temperature at which the most likely next token has about `target` probability, so drafts are
    sometimes accepted and sometimes rejected (a random model is otherwise too flat or too sharp)."""
    cfg = loaded.config
    model = make_engine(loaded).model
    kv = torch.zeros(cfg.num_layers, 2, len(prompt), cfg.num_kv_heads, cfg.head_dim)
    ctx = AttentionContext(slot_mapping=torch.arange(len(prompt)), prefills=[PrefillSpan(0, len(prompt))])
    logits = model.compute_logits(model.forward(torch.tensor(prompt), torch.arange(len(prompt)), ctx, kv))[-1]
    low, high = 1e-3, 1e3
    for _ in range(60):
        mid = (low * high) ** 0.5
        if (logits / mid).softmax(-1).max() > target:
            low = mid
        else:
            high = mid
    return low


def _first_tokens(engine, prompt, seeds: int, steps: int, temperature: float) -> torch.Tensor:
    params = [
        SamplingParams(temperature=temperature, seed=s, max_tokens=steps, ignore_eos=True)
        for s in range(seeds)
    ]
    for s, p in enumerate(params):
        engine.add_request(f"s{s}", prompt, p)
    done = run_to_completion(engine)
    return torch.tensor([done[f"s{s}"].outputs[0].token_ids for s in range(seeds)])


def _chi_square_same_distribution(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of a two-sample chi-square homogeneity test over the categories seen."""
    categories = sorted(set(a.tolist()) | set(b.tolist()))
    counts = torch.tensor([[(x == c).sum().item() for c in categories] for x in (a, b)], dtype=torch.float64)
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    keep = expected.min(0).values >= 5  # pool rare categories together
    observed = torch.cat([counts[:, keep], counts[:, ~keep].sum(1, keepdim=True)], 1)
    expected = torch.cat([expected[:, keep], expected[:, ~keep].sum(1, keepdim=True)], 1)
    nonzero = expected[0] > 0
    observed, expected = observed[:, nonzero], expected[:, nonzero]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = observed.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), statistic / 2.0))


def test_sampled_distribution_is_unchanged_by_speculation(tiny_models):
    folder, _ = tiny_models["llama"]
    loaded = load_model(str(folder))
    prompt = [11, 57, 302, 99] * 6
    temperature = _temperature_for_top_probability(loaded, prompt, 0.3)
    # The first token comes from the prefill; tokens 2-4 are where drafts get verified. The proposer
    # always guesses the same tokens, so every sequence verifies (and mostly rejects) drafts.
    plain = _first_tokens(make_engine(loaded), prompt, 400, 4, temperature)
    engine = make_engine(loaded, speculative="ngram:k=3,crossover_tokens=100000")
    engine.proposer = FixedProposer(plain[:, 1:].mode(dim=0).values.tolist())
    spec = _first_tokens(engine, prompt, 400, 4, temperature)
    assert engine.stats.spec_draft_tokens > 0 and engine.stats.spec_accepted_tokens > 0
    for position in range(1, 4):
        assert _chi_square_same_distribution(plain[:, position], spec[:, position]) > 0.001
    assert_no_leak(engine)
