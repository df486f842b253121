"""A float16 KV cache: twice the tokens in the same memory, the same greedy text as float32 (real model)."""

import pytest
import torch

from tests.conftest import assert_no_leak, make_engine, run_to_completion
from tokenmill.errors import InvalidParameterError
from tokenmill.sampling import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)


def _generate(engine, prompts):
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, PARAMS)
    done = run_to_completion(engine)
    return [done[str(i)].outputs[0] for i in range(len(prompts))]


TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    # Long enough for two prefill chunks: the second reads the first one's K/V back from the cache.
    "A short history of the printing press. " * 12,
]
OPTIONS = dict(kv_cache_gib=0.05, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def fp32_run(smollm_loaded):
    """The fp32 cache's block count and greedy outputs, the reference of every narrower cache."""
    prompts = [smollm_loaded.tokenizer.encode(text) for text in TEXTS]
    full = make_engine(smollm_loaded, **OPTIONS)
    return prompts, full.block_manager.num_blocks, _generate(full, prompts)


def test_float16_cache_keeps_greedy_outputs_at_half_the_bytes(smollm_loaded, fp32_run):
    prompts, full_blocks, expected = fp32_run
    half = make_engine(smollm_loaded, kv_cache_dtype="float16", **OPTIONS)
    assert half.runner.kv_cache.dtype == torch.float16
    assert half.block_manager.num_blocks // 2 == full_blocks  # (floors of the same budget)
    got = _generate(half, prompts)
    assert half.model._decode_stack.runs() > 0  # decode steps read the fp16 cache in the C++ stack
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for a, b in zip(got, expected, strict=True):
        drift = max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True))
        assert drift < 0.05, drift
    assert_no_leak(half)


def test_unknown_kv_cache_dtype_is_refused(smollm_loaded):
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype"):
        make_engine(smollm_loaded, kv_cache_dtype="int3")


def test_int8_cache_holds_3_7x_the_tokens_and_stays_close(smollm_loaded, fp32_run):
    """int8 rows with one scale each: 68 bytes per (token, head) against fp32's 256. Rounding K/V to 8 bits
    moves log-probabilities by a few hundredths, so greedy text may part from fp32's late in a continuation;
    it must not part early, and where it agrees the log-probabilities must stay close."""
    prompts, full_blocks, expected = fp32_run
    small = make_engine(smollm_loaded, kv_cache_dtype="int8", **OPTIONS)
    assert small.runner.kv_cache.dtype == torch.int8 and small.runner.kv_cache.shape[-1] == 64 + 4
    assert small.block_manager.num_blocks >= 3.7 * full_blocks
    got = _generate(small, prompts)
    assert small.model._decode_stack.runs() > 0  # decode steps read and write the int8 cache in C++
    for a, b in zip(got, expected, strict=True):
        pairs = enumerate(zip(a.token_ids, b.token_ids, strict=True))
        agree = next((i for i, (x, y) in pairs if x != y), len(a.token_ids))
        assert agree >= 5, (a.token_ids, b.token_ids)
        common = zip(a.logprobs[:agree], b.logprobs[:agree], strict=True)
        drift = max(abs(x.logprob - y.logprob) for x, y in common)
        assert drift < 0.15, drift
    assert_no_leak(small)
