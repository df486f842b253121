"""The official openai SDK against a real server: completions, chat, streaming, n, stop, logprobs."""

import openai
import pytest

from tests.conftest import make_engine, run_to_completion
from tokenmill.sampling import SamplingParams


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=f"{smol_server.url}/v1", api_key="unused", max_retries=0)


def _offline(smollm_loaded, prompt, max_tokens):
    engine = make_engine(smollm_loaded)
    engine.add_request("x", prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    return run_to_completion(engine)["x"].outputs[0]


def test_greedy_completion_equals_offline_generate(client, smollm_loaded):
    prompt = "The three primary colours are"
    result = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=16, temperature=0
    )
    expected = _offline(smollm_loaded, prompt, 16)
    assert result.choices[0].text == expected.text
    assert result.choices[0].finish_reason == expected.finish_reason
    assert result.usage.completion_tokens == len(expected.token_ids)
    assert result.usage.prompt_tokens == len(smollm_loaded.tokenizer.encode(prompt))


def test_streamed_completion_concatenates_to_the_same_text(client):
    prompt = "Once upon a time"
    whole = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=20, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completion_and_stream(client, smollm_loaded):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0)
    assert "Paris" in result.choices[0].message.content
    assert result.choices[0].finish_reason == "stop"
    prompt = smollm_loaded.tokenizer.apply_chat_template(messages)
    assert result.choices[0].message.content == _offline(smollm_loaded, prompt, 64).text
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == result.choices[0].message.content


def test_n_stop_and_logprobs(client):
    result = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="List of fruits:", max_tokens=12, temperature=1.0, seed=3, n=2
    )
    assert sorted(c.index for c in result.choices) == [0, 1]
    free = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="1, 2, 3,", max_tokens=12, temperature=0
    )
    stopped = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="1, 2, 3,", max_tokens=12, temperature=0, stop=[" 6"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert " 6" in free.choices[0].text and stopped.choices[0].text == free.choices[0].text.split(" 6")[0]
    with_lp = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2
    )
    lp = with_lp.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


def test_echo_returns_prompt_then_completion(client):
    result = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="Hello there", max_tokens=3, temperature=0, echo=True
    )
    assert result.choices[0].text.startswith("Hello there")


def test_models_and_unknown_model(client):
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
