"""The C++ decode stack (kernels/cpu_decode.cpp) computes exactly what the Python layers compute."""

from __future__ import annotations

import pytest

from tests.conftest import make_engine, run_to_completion
from tokenmill.models.loader import load_model
from tokenmill.sampling import SamplingParams

PROMPTS = [[5, 17, 300, 41], list(range(100, 140)), [7], list(range(900, 907))]


def _generate(engine, use_stack: bool) -> dict:
    model = engine.model
    stack = model._decode_stack
    if not use_stack:
        model._decode_stack = None
    try:
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, params)
        return run_to_completion(engine)
    finally:
        model._decode_stack = stack


# An int8 KV cache: the C++ step rounds its K/V rows to the very bytes the Python path writes.
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: QKV bias and an untied head
def test_decode_stack_equals_the_python_layers(tiny_models, arch, quantization, kv_cache_dtype):
    folder, _ = tiny_models[arch]
    # No prefix cache: the second run must prefill exactly as the first did.
    engine = make_engine(
        load_model(folder),
        quantization=quantization,
        enable_prefix_caching=False,
        kv_cache_dtype=kv_cache_dtype,
    )
    assert engine.model._decode_stack is not None
    fast = _generate(engine, True)
    assert engine.model._decode_stack.runs() >= 9  # every step after the prefill was all-decode
    slow = _generate(engine, False)
    for i in range(len(PROMPTS)):
        a, b = fast[str(i)].outputs[0], slow[str(i)].outputs[0]
        assert a.token_ids == b.token_ids
        # Same kernels in the same order: the log-probabilities agree to the bit, not just closely.
        assert a.logprobs == b.logprobs


def test_models_the_stack_cannot_run_take_the_python_path(tiny_models):
    folder, _ = tiny_models["qwen3"]  # q/k norm is not in the stack
    assert make_engine(load_model(folder)).model._decode_stack is None
