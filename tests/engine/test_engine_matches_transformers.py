"""Greedy outputs equal HF transformers token for token, under every scheduling path."""

import random

import pytest

from tests.conftest import TINY_ARCHITECTURES, assert_no_leak, hf_greedy, make_engine, run_to_completion
from tokenmill.models.loader import load_model
from tokenmill.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _mixed_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Lengths 1..300, with a shared 64-token prefix on some so prefix caching is exercised."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(64)]
    prompts = []
    for length in (1, 2, 7, 16, 17, 33, 64, 95, 128, 200, 300):
        prompts.append([rng.randrange(3, vocab) for _ in range(length)])
    for extra in (1, 15, 40):
        prompts.append(shared + [rng.randrange(3, vocab) for _ in range(extra)])
    prompts.append(list(shared))
    return prompts


def _run(engine, prompts, params=GREEDY):
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done = run_to_completion(engine)
    return [done[str(i)].outputs[0].token_ids for i in range(len(prompts))]


@pytest.fixture(scope="module")
def references(tiny_models):
    refs = {}
    for arch in TINY_ARCHITECTURES:
        _, model = tiny_models[arch]
        prompts = _mixed_prompts(model.config.vocab_size)
        refs[arch] = (prompts, [hf_greedy(model, p, GREEDY.max_tokens) for p in prompts])
    return refs


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_batched_greedy_matches_transformers(tiny_models, references, arch):
    loaded = load_model(str(tiny_models[arch][0]))
    prompts, expected = references[arch]
    engine = make_engine(loaded)
    assert _run(engine, prompts) == expected
    assert_no_leak(engine)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_and_prefix_cache_match_transformers(tiny_models, references, arch):
    loaded = load_model(str(tiny_models[arch][0]))
    prompts, expected = references[arch]
    engine = make_engine(loaded, max_num_batched_tokens=48, block_size=16)
    assert _run(engine, prompts) == expected
    assert engine.block_manager.prefix_hits > 0
    # A second pass over the same prompts is served largely from the prefix cache.
    hits_before = engine.block_manager.prefix_hits
    assert _run(engine, prompts) == expected
    assert engine.block_manager.prefix_hits - hits_before >= sum(
        len(p) // 16 - 1 for p in prompts if len(p) > 32
    )
    assert_no_leak(engine)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_preempted_requests_resume_with_same_output(tiny_models, references, arch):
    loaded = load_model(str(tiny_models[arch][0]))
    prompts, expected = references[arch]
    # 320 + 12 tokens fit 21 blocks of 16: the longest request fits alone, not with many others.
    engine = make_engine(loaded, num_kv_blocks=24, block_size=16, max_num_batched_tokens=128)
    assert _run(engine, prompts) == expected
    assert engine.scheduler.num_preemptions > 0
    assert_no_leak(engine)


def test_smollm_greedy_matches_transformers(smollm_loaded, hf_smollm):
    tokenizer = smollm_loaded.tokenizer
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
        "def fibonacci(n):",
        "Once upon a time",
        "The three primary colours are",
    ]
    prompts = [tokenizer.encode(t) for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = [hf_greedy(hf_smollm, p, 20) for p in prompts]
    engine = make_engine(smollm_loaded)
    assert _run(engine, prompts, params) == expected
    assert_no_leak(engine)
