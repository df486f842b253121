"""The model's forward pass given only the rows a step samples: the same outputs for those rows."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_engine, run_to_completion
from tokenmill.models.loader import load_model
from tokenmill.sampling import SamplingParams

# Prefill chunks of several rows, in one step (the last row of each is sampled) and over steps (a chunk's
# first steps sample nothing).
PROMPTS = [[5, 17, 300, 41], list(range(100, 140)), [7], list(range(900, 907))]


def _generate(engine, pruned: bool) -> tuple[dict, list[int]]:
    model = engine.model
    forward = model.forward
    seen: list[int] = []

    def counted(input_ids, positions, ctx, kv_cache, rows=None):
        if rows is not None:
            seen.append(len(rows))
        if pruned:
            return forward(input_ids, positions, ctx, kv_cache, rows)
        hidden = forward(input_ids, positions, ctx, kv_cache)
        return hidden if rows is None else hidden[rows]

    model.forward = counted
    try:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, params)
        return run_to_completion(engine), seen
    finally:
        model.forward = forward


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_last_layer_on_the_sampled_rows_only_changes_no_output(tiny_models, quantization):
    folder, _ = tiny_models["qwen2"]  # QKV bias and an untied head
    engine = make_engine(
        load_model(folder), quantization=quantization, enable_prefix_caching=False, max_num_batched_tokens=32
    )
    pruned, seen = _generate(engine, True)
    assert seen == [1, 4]  # prefill steps: 1 of 32 rows sampled (a chunk ends mid-prompt), then 4 of 21
    full, _ = _generate(engine, False)
    for i in range(len(PROMPTS)):
        a, b = pruned[str(i)].outputs[0], full[str(i)].outputs[0]
        assert a.token_ids == b.token_ids
        if quantization:  # the integer kernels give every row the same bits whatever rows share its batch
            assert a.logprobs == b.logprobs
        else:  # fp32 matmuls of fewer rows may sum in another order
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert x.token_id == y.token_id
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_forward_of_no_rows_is_empty(tiny_models):
    folder, _ = tiny_models["llama"]
    engine = make_engine(load_model(folder), enable_prefix_caching=False)
    engine.add_request("0", list(range(100, 120)), SamplingParams(max_tokens=1))
    runner = engine.runner
    batch = engine.scheduler.schedule()
    input_ids, positions, ctx, _ = runner.prepare(batch.entries)
    hidden = engine.model.forward(
        input_ids, positions, ctx, runner.kv_cache, torch.tensor([], dtype=torch.long)
    )
    assert hidden.shape == (0, engine.model.config.hidden_size)
