"""Speculative decoding with a draft model: exact greedy output, unchanged sampling, both KV caches rolled
back and freed, typed errors for bad drafts."""

import copy
import json
from importlib import resources

import pytest
import torch

from tests.conftest import _save_tiny, assert_no_leak, make_engine, mixed_outputs, mixed_requests
from tests.engine.test_speculative import (
    _chi_square_same_distribution,
    _first_tokens,
    _temperature_for_top_probability,
)
from tokenmill.bench.workloads import chat_messages, grounded_messages
from tokenmill.cli import main
from tokenmill.engine.speculative import SpeculativeConfig
from tokenmill.errors import IncompatibleDraftError, InvalidParameterError, ModelLoadError
from tokenmill.layers.sampler import SamplingRow, verify_draft
from tokenmill.llm import LLM
from tokenmill.models.draft import DraftFileInfo, save_draft_file
from tokenmill.models.loader import load_model
from tokenmill.sampling import SamplingParams
from tokenmill.train.samples import training_conversations

ANY_BATCH = "crossover_tokens=100000"  # speculate at every batch size


def assert_draft_idle(engine) -> None:
    proposer = engine.proposer
    assert proposer.block_manager.num_free_blocks == proposer.block_manager.num_blocks
    assert all(count == 0 for count in proposer.block_manager.ref_counts)
    assert not proposer.shadows


def test_speculative_config_parses_draft_specs():
    config = SpeculativeConfig.parse("draft=/models/d.safetensors,k=3")
    assert (config.method, config.draft_path, config.k) == ("draft", "/models/d.safetensors", 3)
    assert SpeculativeConfig.parse("draft=folder").k == 4
    assert SpeculativeConfig.parse("draft=d.safetensors,k=3,ngram=1").ngram == 1
    bad_specs = ("draft=", "draft=x,k=0", "draft=x,k=", "draft=x,min_ngram=2", "draft=x,ngram=2", "draft:x")
    for bad in (*bad_specs, "model=x", "ngram:ngram=1"):
        with pytest.raises(InvalidParameterError):
            SpeculativeConfig.parse(bad)


def test_greedy_output_with_a_smaller_draft_model_equals_plain_output(llama_loaded, llama_plain, tiny_draft):
    engine = make_engine(llama_loaded, speculative=f"draft={tiny_draft},k=3,{ANY_BATCH}", block_size=8)
    assert mixed_outputs(engine) == llama_plain
    assert engine.stats.spec_draft_tokens > 0
    assert_no_leak(engine)
    assert_draft_idle(engine)


def test_a_draft_of_itself_is_accepted_almost_always_and_changes_nothing(tiny_models):
    folder = str(tiny_models["qwen3"][0])
    loaded = load_model(folder)
    plain = mixed_outputs(make_engine(loaded))
    engine = make_engine(loaded, speculative=f"draft={folder},k=4,{ANY_BATCH}")
    assert mixed_outputs(engine) == plain
    stats = engine.stats
    assert stats.spec_accepted_tokens >= 0.95 * stats.spec_draft_tokens
    assert stats.spec_mean_accepted_length > 4.0
    assert_no_leak(engine)
    assert_draft_idle(engine)


def test_llm_api_takes_a_draft_model(tiny_models, tiny_draft):
    folder = str(tiny_models["llama"][0])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = LLM(folder, num_threads=2).generate("Hello there", params)[0].outputs[0].token_ids
    llm = LLM(folder, num_threads=2, speculative=f"draft={tiny_draft},k=2")
    assert llm.generate("Hello there", params)[0].outputs[0].token_ids == plain
    assert llm.engine.stats.spec_draft_tokens > 0


def test_rejection_rule_with_draft_probabilities_keeps_the_target_distribution():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5], [0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([0.1, 0.6, 0.2, 0.1])  # the draft's distribution, far from the target's
    row = SamplingRow(SamplingParams(temperature=1.0), None, [], [], [])
    firsts = []
    for seed in range(3000):
        row.generator = torch.Generator().manual_seed(seed)
        guess = int(torch.multinomial(q, 1, generator=row.generator))
        firsts.append(verify_draft(logits, [guess], row, q.unsqueeze(0))[0])
    frequencies = torch.bincount(torch.tensor(firsts), minlength=4).double() / len(firsts)
    assert (frequencies - logits[0].double().softmax(-1)).abs().max() < 0.03


@pytest.fixture(scope="module")
def noisy_copy(tiny_models, smollm_loaded, tmp_path_factory):
    """The tiny llama with noise added to its weights: a draft whose q is near the target's p but not
    equal, so sampled drafts are often accepted and sometimes rejected."""
    model = copy.deepcopy(tiny_models["llama"][1])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3 * param.std())
    folder = tmp_path_factory.mktemp("noisy-draft")
    _save_tiny(model, folder, smollm_loaded.tokenizer)
    return folder


def test_sampled_distribution_is_unchanged_by_a_sampling_draft_model(tiny_models, noisy_copy):
    loaded = load_model(str(tiny_models["llama"][0]))
    prompt = [11, 57, 302, 99] * 6
    temperature = _temperature_for_top_probability(loaded, prompt, 0.3)
    plain = _first_tokens(make_engine(loaded), prompt, 240, 3, temperature)
    engine = make_engine(loaded, speculative=f"draft={noisy_copy},k=3,{ANY_BATCH}")
    spec = _first_tokens(engine, prompt, 240, 3, temperature)
    stats = engine.stats
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # both accepts and rejects happened
    for position in range(1, 3):
        assert _chi_square_same_distribution(plain[:, position], spec[:, position]) > 0.001
    assert_no_leak(engine)
    assert_draft_idle(engine)


def test_both_kv_caches_return_to_idle_after_rejections_aborts_and_preemption(
    llama_loaded, llama_plain, tiny_draft
):
    loaded, plain = llama_loaded, llama_plain
    # 12 blocks of 8 tokens cannot hold the whole batch: sequences get preempted and recomputed.
    engine = make_engine(
        loaded, speculative=f"draft={tiny_draft},k=3,{ANY_BATCH}", block_size=8, num_kv_blocks=12
    )
    assert mixed_outputs(engine) == plain
    assert engine.scheduler.num_preemptions > 0
    assert_no_leak(engine)
    assert_draft_idle(engine)
    mixed_requests(engine)
    for _ in range(6):
        engine.step()
    assert engine.proposer.shadows  # the draft holds KV for the running sequences...
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    assert_no_leak(engine)
    assert_draft_idle(engine)  # ...and gives it all back on abort


def test_bad_draft_paths_and_mismatched_drafts_are_typed_errors(tiny_models, tmp_path):
    loaded = load_model(str(tiny_models["llama"][0]))
    with pytest.raises(ModelLoadError):
        make_engine(loaded, speculative=f"draft={tmp_path / 'missing.safetensors'}")
    with pytest.raises(ModelLoadError):
        make_engine(loaded, speculative=f"draft={tmp_path / 'no-such-folder'}")
    not_a_draft = tmp_path / "weights.safetensors"
    save_draft_file(not_a_draft, {"x": torch.zeros(2)}, DraftFileInfo("t", 1, 1, 0, [], {}))
    not_a_draft.write_bytes(not_a_draft.read_bytes()[:40])  # truncated
    with pytest.raises(ModelLoadError):
        make_engine(loaded, speculative=f"draft={not_a_draft}")
    other_vocab = tmp_path / "other.safetensors"
    cfg = loaded.config
    info = DraftFileInfo("other-model", cfg.vocab_size + 1, cfg.hidden_size, 0, [], {})
    save_draft_file(other_vocab, {"model.norm.weight": torch.ones(cfg.hidden_size)}, info)
    with pytest.raises(IncompatibleDraftError, match="vocab"):
        make_engine(loaded, speculative=f"draft={other_vocab}")


def test_draft_train_writes_a_file_that_speculates_exactly(
    tiny_models, llama_loaded, llama_plain, tmp_path, capsys
):
    folder = str(tiny_models["llama"][0])
    output = tmp_path / "draft.safetensors"
    command = ["draft", "train", "--model", folder, "--output", str(output), "--max-steps", "4"]
    command += ["--max-prompts", "8", "--answer-tokens", "12", "--layers", "1", "--head-tokens", "3000"]
    command += ["--batch-size", "4", "--threads", "2", "--kind", "layers"]
    assert main(command) == 0  # the command line's own entry point, in this process
    assert output.is_file() and "4 steps" in capsys.readouterr().out
    engine = make_engine(llama_loaded, speculative=f"draft={output},k=3,{ANY_BATCH}")
    assert engine.proposer.draft.head_token_ids is not None  # the draft scores a vocabulary subset
    assert mixed_outputs(engine) == llama_plain
    assert engine.stats.spec_draft_tokens > 0
    assert_no_leak(engine)
    assert_draft_idle(engine)


def test_training_prompts_lead_with_the_questions_and_never_hold_a_benchmark_prompt():
    bench = {m[0]["content"].lower() for m in chat_messages() + grounded_messages()}
    texts = [c[0]["content"] for c in training_conversations(seed=0)]
    assert len(texts) == len(set(texts)) and not bench & {t.lower() for t in texts}
    data = json.loads(resources.files("tokenmill.train").joinpath("data/draft_prompts.json").read_text())
    questions = set(data["questions"])
    head = texts[: 2 * len(questions)]  # answers are collected for a fixed time: the varied text comes first
    assert sum(t in questions for t in head) == len(questions)
    assert training_conversations(seed=0) == training_conversations(seed=0) != training_conversations(seed=1)
