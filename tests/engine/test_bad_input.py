"""Bad input gets a typed error, and the engine keeps serving everyone else correctly."""

import pytest

from tests.conftest import assert_no_leak, make_engine, run_to_completion
from tokenmill import LLM, SamplingParams
from tokenmill.errors import (
    InvalidParameterError,
    ModelLoadError,
    PromptTooLongError,
    RequestTooLargeError,
)
from tokenmill.models.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return load_model(str(tiny_models["qwen2"][0]))


def test_each_bad_request_fails_alone_and_the_engine_keeps_serving(tiny):
    engine = make_engine(tiny, max_model_len=128, num_kv_blocks=6, block_size=16)
    engine.add_request("good-before", list(range(5, 25)), GREEDY)
    engine.step()  # it is running when the bad ones arrive
    bad = [
        ("", InvalidParameterError),
        ([], InvalidParameterError),
        ([1, 2, 10**9], InvalidParameterError),
        ("x" * 10, None),  # fine: used below as the baseline for the 'ok' path
        (list(range(3, 200)), PromptTooLongError),
        (list(range(3, 100)), RequestTooLargeError),  # 97 + 6 tokens > 6 blocks of 16
    ]
    for i, (prompt, error) in enumerate(bad):
        if error is None:
            continue
        with pytest.raises(error):
            engine.add_request(f"bad-{i}", prompt, GREEDY)
    with pytest.raises(InvalidParameterError, match="already in use"):
        engine.add_request("good-before", [5, 6, 7], GREEDY)
    engine.add_request("good-after", list(range(5, 25)), GREEDY)
    done = run_to_completion(engine)
    assert set(done) == {"good-before", "good-after"}
    assert done["good-before"].outputs[0].token_ids == done["good-after"].outputs[0].token_ids
    assert_no_leak(engine)


def test_aborted_request_frees_its_blocks(tiny):
    engine = make_engine(tiny)
    engine.add_request("a", list(range(5, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", list(range(5, 30)), GREEDY)
    engine.step()
    engine.abort_request("a")
    done = run_to_completion(engine)
    assert set(done) == {"b"}
    assert_no_leak(engine)


def test_unknown_model_raises_model_load_error():
    with pytest.raises(ModelLoadError, match="not found"):
        LLM(model="/nonexistent/model.gguf")


def test_offline_generate_rejects_bad_batches_without_leaving_requests_behind(tiny):
    llm = LLM(config=make_engine(tiny).config, loaded=tiny)
    with pytest.raises(InvalidParameterError):
        llm.generate(["fine prompt", ""], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    outputs = llm.generate(["fine prompt", [5, 6, 7]], GREEDY)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [6, 6]
