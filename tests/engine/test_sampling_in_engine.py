"""Sampling behaviour through the whole engine: seeds, n > 1, stops, min_tokens, logprobs, penalties."""

import pytest
import torch

from tests.conftest import assert_no_leak, hf_greedy, make_engine, run_to_completion
from tokenmill.models.loader import load_model
from tokenmill.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return load_model(str(tiny_models["llama"][0]))


@pytest.fixture(scope="module")
def smol_engine(smollm_loaded):
    return make_engine(smollm_loaded, block_size=16)


def _generate(engine, prompts, params):
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{i}", prompt, params if isinstance(params, SamplingParams) else params[i])
    done = run_to_completion(engine)
    return [done[f"q{i}"] for i in range(len(prompts))]


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    prompt = list(range(10, 40))
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = _generate(make_engine(tiny), [prompt], params)[0].outputs[0].token_ids
    again = _generate(make_engine(tiny), [prompt], params)[0].outputs[0].token_ids
    assert alone == again
    others = [list(range(50, 50 + n)) for n in (3, 17, 80)]
    unseeded = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    engine = make_engine(tiny)
    mixed = _generate(engine, [*others, prompt], [unseeded, unseeded, unseeded, params])
    assert mixed[-1].outputs[0].token_ids == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True)
    assert _generate(engine, [prompt], different_seed)[0].outputs[0].token_ids != alone
    assert_no_leak(engine)


def test_parallel_samples_share_prompt_blocks(tiny):
    engine = make_engine(tiny, block_size=16)
    prompt = list(range(100, 150))  # 3 full blocks + 2 tokens
    engine.add_request(
        "n4", prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    )
    engine.step()  # prefill of the parent; children fork from it
    request = engine.requests["n4"]
    assert len(request.seqs) == 4
    shared = request.seqs[0].block_table[:3]
    assert all(s.block_table[:3] == shared for s in request.seqs)
    assert all(engine.block_manager.ref_counts[b] == 4 for b in shared)
    done = run_to_completion(engine)["n4"]
    texts = [tuple(o.token_ids) for o in done.outputs]
    assert len(texts) == 4 and all(len(t) == 8 for t in texts)
    assert len(set(texts)) > 1, "independent samples should differ"
    assert_no_leak(engine)


def test_parallel_greedy_samples_equal_single_greedy(tiny_models, tiny):
    prompt = list(range(7, 47))
    expected = hf_greedy(tiny_models["llama"][1], prompt, 10)
    engine = make_engine(tiny)
    done = _generate(engine, [prompt], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert [o.token_ids for o in done.outputs] == [expected] * 3
    assert_no_leak(engine)


def test_top_k_one_is_greedy(tiny):
    prompt = list(range(20, 60))
    greedy = _generate(
        make_engine(tiny), [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    topk = _generate(
        make_engine(tiny), [prompt], SamplingParams(temperature=0.9, top_k=1, max_tokens=12, ignore_eos=True)
    )
    assert greedy[0].outputs[0].token_ids == topk[0].outputs[0].token_ids


def test_repetition_penalty_matches_transformers(tiny_models, tiny):
    model = tiny_models["llama"][1]
    prompt = list(range(30, 50))
    with torch.no_grad():
        reference = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.5,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    params = SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=12, min_tokens=12)
    assert _generate(make_engine(tiny), [prompt], params)[0].outputs[0].token_ids == reference


def test_stop_string_cuts_text_and_stop_token_ends(smol_engine):
    prompt = "The capital of France is"
    free = _generate(smol_engine, [prompt], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    stop_word = free.text.strip().split()[2]
    cut = _generate(smol_engine, [prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop_word]))[0]
    out = cut.outputs[0]
    assert out.finish_reason == "stop"
    assert stop_word not in out.text and free.text.startswith(out.text)
    kept = _generate(
        smol_engine,
        [prompt],
        SamplingParams(temperature=0, max_tokens=24, stop=stop_word, include_stop_str_in_output=True),
    )[0].outputs[0]
    assert kept.text.endswith(stop_word)
    stop_id = free.token_ids[4]
    by_id = _generate(
        smol_engine, [prompt], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id])
    )
    assert by_id[0].outputs[0].token_ids == free.token_ids[:5]
    assert by_id[0].outputs[0].finish_reason == "stop"
    assert_no_leak(smol_engine)


def test_eos_ends_a_chat_answer_unless_min_tokens_or_ignore_eos(smol_engine):
    prompt = smol_engine.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])
    short = _generate(smol_engine, [prompt], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert short.finish_reason == "stop" and short.token_ids[-1] in smol_engine.eos_token_ids
    n = len(short.token_ids)
    longer = _generate(smol_engine, [prompt], SamplingParams(temperature=0, max_tokens=64, min_tokens=n + 3))
    tokens = longer[0].outputs[0].token_ids
    assert len(tokens) >= n + 3
    assert not any(t in smol_engine.eos_token_ids for t in tokens[: n + 2])
    ignored = _generate(
        smol_engine, [prompt], SamplingParams(temperature=0, max_tokens=n + 5, ignore_eos=True)
    )
    assert len(ignored[0].outputs[0].token_ids) == n + 5
    assert ignored[0].outputs[0].finish_reason == "length"


def test_logprobs_match_transformers(smollm_loaded, hf_smollm, smol_engine):
    prompt = smollm_loaded.tokenizer.encode("Water boils at a temperature of")
    result = _generate(smol_engine, [prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    out = result.outputs[0]
    assert len(out.logprobs) == 4
    with torch.no_grad():
        logits = hf_smollm(torch.tensor([prompt + out.token_ids])).logits[0]
    reference = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    for step, entry in enumerate(out.logprobs):
        assert entry.token_id == out.token_ids[step]
        assert abs(entry.logprob - reference[step, entry.token_id].item()) < 1e-3
        assert [t for t, _ in entry.top] == reference[step].topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy picks the most likely
