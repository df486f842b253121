"""Bad requests get OpenAI-shaped 4xx errors, never a 500, and the server keeps serving."""

import json
import subprocess
import sys
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import free_port, running_server


def _assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert param in (error["param"] or "")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "top_p": 2.0}, "top_p"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, -5]}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "logprobs": 50}, "logprobs"),
        ({"prompt": "hi", "seed": 2**80}, "seed"),
        ({"prompt": "hi", "stop_token_ids": [10**9]}, "stop_token_ids"),
        ({"prompt": list(range(3, 2000))}, "prompt"),
    ],
)
def test_bad_completion_requests_are_400(tiny_server, body, param):
    _assert_error(httpx.post(f"{tiny_server.url}/v1/completions", json=body), 400, param)


def test_invalid_json_and_wrong_shapes_are_400(tiny_server):
    url = f"{tiny_server.url}/v1/chat/completions"
    _assert_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _assert_error(httpx.post(url, json=[1, 2, 3]), 400)
    _assert_error(httpx.post(url, json={"messages": []}), 400)
    _assert_error(httpx.post(url, json={"messages": [{"role": "wizard", "content": "x"}]}), 400)


def test_unknown_model_is_404(tiny_server):
    response = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "nope", "prompt": "hi"})
    _assert_error(response, 404, "model")


def test_api_key_is_required_when_set(tiny_loaded):
    with running_server(tiny_loaded, api_key="s3cret") as server:
        body = {"prompt": "hi", "max_tokens": 2}
        _assert_error(httpx.post(f"{server.url}/v1/completions", json=body), 401)
        wrong = {"Authorization": "Bearer nope"}
        _assert_error(httpx.post(f"{server.url}/v1/completions", json=body, headers=wrong), 401)
        ok = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 60000), max_size=8),
    st.lists(st.text(max_size=5), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_keys = st.sampled_from(
    [
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "echo",
        "stream",
        "presence_penalty",
        "frequency_penalty",
        "model",
        "stop_token_ids",
        "min_tokens",
        "max_completion_tokens",
        "stream_options",
        "ignore_eos",
    ]
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(_keys, _values, max_size=8), chat=st.booleans())
def test_fuzzed_bodies_never_500(fuzz_server, body, chat):
    if chat and "messages" not in body:
        body["messages"] = [{"role": "user", "content": "hi"}]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        payload = json.dumps(body, allow_nan=True)
    except ValueError:
        return
    response = httpx.post(
        f"{fuzz_server.url}{path}", content=payload, headers={"content-type": "application/json"}, timeout=120
    )
    assert response.status_code < 500, (body, response.text)


@pytest.fixture(scope="module")
def fuzz_server(tiny_loaded):
    with running_server(tiny_loaded, max_model_len=48) as server:
        yield server


def test_server_still_serves_after_fuzzing(fuzz_server):
    response = httpx.post(f"{fuzz_server.url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    assert fuzz_server.engine.block_manager.num_free_blocks == fuzz_server.engine.block_manager.num_blocks


def test_sigterm_finishes_in_flight_requests_and_exits_zero(tiny_models):
    port = free_port()
    folder = str(tiny_models["llama"][0])
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenmill.cli",
            "serve",
            folder,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"prompt": [5, 6, 7], "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert first
            process.terminate()
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
