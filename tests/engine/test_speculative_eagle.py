"""EAGLE-style drafts: training maths == serving maths, exact greedy output, unchanged sampling, state
released with the sequences, and `tokenmill draft train` making one."""

import pytest
import torch

from tests.conftest import assert_no_leak, make_engine, mixed_outputs, mixed_requests, run_to_completion
from tests.engine.test_speculative import (
    _chi_square_same_distribution,
    _first_tokens,
    _temperature_for_top_probability,
)
from tests.engine.test_speculative_draft import ANY_BATCH
from tokenmill.cli import main
from tokenmill.models.draft import DraftFileInfo, load_draft, save_draft_file
from tokenmill.models.eagle import EagleCache, EagleDraft
from tokenmill.train.draft import DraftTrainConfig, train_draft
from tokenmill.train.eagle_network import EagleNetwork, guess_chain_mask


def assert_eagle_idle(engine) -> None:
    assert not engine.proposer.tracks


@pytest.fixture(scope="module")
def eagle_file(llama_loaded, tmp_path_factory):
    """An EAGLE draft for the tiny llama, trained for a few steps on a few of its answers."""
    output = tmp_path_factory.mktemp("eagle") / "eagle.safetensors"
    config = DraftTrainConfig(
        output=output,
        max_steps=60,
        max_prompts=12,
        answer_tokens=24,
        sampled_answers=1,
        head_tokens=0,
        threads=2,
    )
    result = train_draft(config, llama_loaded)
    assert len(result.heldout_by_depth) == config.depth
    return output


def test_guess_chain_mask_sees_true_keys_then_one_guess_per_earlier_pass():
    mask = guess_chain_mask(5, 3)  # pass 3 over 5 positions; keys of passes 1, 2, 3 side by side
    row = mask[4].view(3, 5)
    assert row[0].tolist() == [True, True, True, False, False]  # true inputs up to position 2
    assert row[1].tolist() == [False, False, False, True, False]  # pass 2's guess at 3
    assert row[2].tolist() == [False, False, False, False, True]  # its own key at 4
    assert guess_chain_mask(4, 1).equal(torch.ones(4, 4, dtype=torch.bool).tril())


def test_serving_draft_computes_what_the_training_network_computes(llama_loaded, tmp_path):
    cfg = llama_loaded.config
    torch.manual_seed(0)
    network = EagleNetwork(cfg, llama_loaded.weights, 0, None, 64)
    with torch.no_grad():
        network.fc.weight.mul_(4.0)
    path = tmp_path / "eagle.safetensors"
    info = DraftFileInfo(cfg.name, cfg.vocab_size, cfg.hidden_size, 1, [0], {}, kind="eagle")
    save_draft_file(path, network.export(), info)
    draft = load_draft(str(path), llama_loaded, 64, torch.float32)
    assert isinstance(draft, EagleDraft)
    length = 9
    features = torch.randn(1, length, cfg.hidden_size)
    next_ids = torch.randint(0, cfg.vocab_size, (1, length))
    with torch.no_grad():
        first, second = network(features, next_ids, 2)
    cache = EagleCache(0)
    served = draft.extend(cache, features[0], next_ids[0], 0)
    torch.testing.assert_close(served, first[0], atol=2e-4, rtol=1e-4)
    # Two guesses deep at position 6: true states up to 5, then the guess for 6 fed back in.
    cache = EagleCache(0)
    guess = draft.extend(cache, features[0, :6], next_ids[0, :6], 0)[-1:]
    served = draft.extend(cache, guess, next_ids[0, 6:7], 6)
    torch.testing.assert_close(served[0], second[0, 6], atol=2e-4, rtol=1e-4)
    assert draft.logits(served).shape[-1] == cfg.vocab_size


def test_greedy_output_with_an_eagle_draft_equals_plain_output(llama_loaded, llama_plain, eagle_file):
    engine = make_engine(llama_loaded, speculative=f"draft={eagle_file},k=3,{ANY_BATCH}", block_size=8)
    assert mixed_outputs(engine) == llama_plain
    assert engine.stats.spec_draft_tokens > 0
    assert_no_leak(engine)
    assert_eagle_idle(engine)


def test_prompt_lookup_first_then_eagle_keeps_greedy_output(llama_loaded, llama_plain, eagle_file):
    engine = make_engine(llama_loaded, speculative=f"draft={eagle_file},k=3,ngram=1,{ANY_BATCH}")
    guessed = []
    propose = engine.proposer.propose
    engine.proposer.propose = lambda seqs, counts: guessed.append(len(seqs)) or propose(seqs, counts)
    assert mixed_outputs(engine) == llama_plain
    assert engine.stats.spec_accepted_tokens > 0
    # The repetitive prompts are served by lookup, so the draft is asked for fewer sequences than run.
    assert sum(guessed) < engine.stats.spec_verifications
    assert_no_leak(engine)
    assert_eagle_idle(engine)


def test_eagle_survives_preemption_prefix_hits_and_aborts(llama_loaded, llama_plain, eagle_file):
    # 12 blocks of 8 tokens cannot hold the whole batch: sequences are preempted and recomputed, and
    # recomputation hits the prefix cache, so the draft sees gaps in the target's states.
    engine = make_engine(
        llama_loaded,
        speculative=f"draft={eagle_file},k=2,{ANY_BATCH}",
        block_size=8,
        num_kv_blocks=12,
        enable_prefix_caching=True,
    )
    assert mixed_outputs(engine) == llama_plain
    assert engine.scheduler.num_preemptions > 0
    assert_no_leak(engine)
    assert_eagle_idle(engine)
    mixed_requests(engine)
    for _ in range(6):
        engine.step()
    assert engine.proposer.tracks
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    assert_eagle_idle(engine)


def test_sampled_distribution_is_unchanged_by_an_eagle_draft(llama_loaded, eagle_file):
    prompt = [11, 57, 302, 99] * 6
    temperature = _temperature_for_top_probability(llama_loaded, prompt, 0.3)
    plain = _first_tokens(make_engine(llama_loaded), prompt, 240, 3, temperature)
    engine = make_engine(llama_loaded, speculative=f"draft={eagle_file},k=3,{ANY_BATCH}")
    spec = _first_tokens(engine, prompt, 240, 3, temperature)
    # The briefly trained draft is mostly rejected here: this checks the rejection rule's residual with
    # the EAGLE draft's q (accepting paths are covered with a near-copy draft in test_speculative_draft).
    assert engine.stats.spec_draft_tokens > 0
    for position in range(1, 3):
        assert _chi_square_same_distribution(plain[:, position], spec[:, position]) > 0.001
    assert_no_leak(engine)
    assert_eagle_idle(engine)


def test_draft_train_cli_makes_an_eagle_draft_by_default(tiny_models, llama_loaded, tmp_path, capsys):
    output = tmp_path / "eagle.safetensors"
    command = ["draft", "train", "--model", str(tiny_models["llama"][0]), "--output", str(output)]
    command += ["--max-steps", "3", "--max-prompts", "6", "--answer-tokens", "10", "--head-tokens", "500"]
    command += ["--sampled-answers", "0", "--depth", "2", "--threads", "2"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "3 steps" in printed and "guesses 1..n" in printed
    engine = make_engine(llama_loaded, speculative=f"draft={output},k=2,{ANY_BATCH}")
    assert isinstance(engine.proposer.draft, EagleDraft)
    assert 0 < engine.proposer.draft.head_token_ids.numel() <= 500  # scores a vocabulary subset
    engine.add_request("a", [5, 6, 7, 8] * 3)
    assert run_to_completion(engine)["a"].outputs[0].token_ids


def test_verification_steps_run_as_decode_rows_through_the_decode_stack(llama_loaded, llama_plain):
    engine = make_engine(llama_loaded, speculative=f"ngram:k=3,{ANY_BATCH}")
    stack = engine.model._decode_stack
    assert stack is not None
    before = stack.runs()
    assert mixed_outputs(engine) == llama_plain
    assert engine.stats.spec_verifications > 0
    # Every step after the prefills is all-decode, verification spans included.
    assert stack.runs() - before >= engine.stats.steps - 8


@pytest.mark.parametrize("decode_stack", [True, False])
def test_second_choice_branch_is_verified_exactly_in_the_same_pass(
    llama_loaded, llama_plain, eagle_file, decode_stack
):
    """The draft's second choice for the first token rides along as its own decode row (scratch block, the
    parent's K/V copied in); when the target picks it, it and the token after it are kept, exactly. Every
    other proposal here is made wrong at its first token with the right one as the branch (the tiny draft's
    own second choices are rarely right)."""
    engine = make_engine(llama_loaded, speculative=f"draft={eagle_file},k=3,{ANY_BATCH}", block_size=8)
    vocab = llama_loaded.config.vocab_size
    guess = engine.proposer._guess
    calls = []

    def wrong_first_right_branch(seq, track, k):
        proposal = guess(seq, track, k)
        truth = llama_plain[seq.request_id][seq.num_output_tokens]
        calls.append(seq.seq_id)
        if len(calls) % 2:
            proposal.token_ids[0] = (truth + 1) % vocab
            proposal.branch = truth
        return proposal

    engine.proposer._guess = wrong_first_right_branch
    stack = engine.model._decode_stack
    if not decode_stack:
        engine.model._decode_stack = None  # the Python layers: slot copies through paged_attention
    try:
        assert mixed_outputs(engine) == llama_plain
    finally:
        engine.model._decode_stack = stack
    assert engine.stats.spec_branch_tokens >= len(calls) // 4
    assert_no_leak(engine)
    assert_eagle_idle(engine)


def test_the_branch_can_be_turned_off(llama_loaded, llama_plain, eagle_file):
    engine = make_engine(llama_loaded, speculative=f"draft={eagle_file},k=3,branch=0,{ANY_BATCH}")
    guess = engine.proposer._guess
    branches = []

    def recording(seq, track, k):
        proposal = guess(seq, track, k)
        branches.append(proposal.branch)
        return proposal

    engine.proposer._guess = recording
    assert mixed_outputs(engine) == llama_plain
    assert branches and not any(branches) and engine.stats.spec_branch_tokens == 0
