"""Speculative decoding behind the server: same greedy text, acceptance counters in /metrics."""

import httpx

from tests.serve.conftest import running_server


def test_speculative_server_matches_plain_and_reports_acceptance(tiny_loaded, tiny_server):
    body = {"prompt": [11, 57, 302, 99, 4000, 12] * 6, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=120).json()
    with running_server(tiny_loaded, speculative="ngram:k=4,crossover_tokens=1000") as server:
        fast = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
        assert fast["choices"][0]["text"] == plain["choices"][0]["text"]
        assert server.metric("tokenmill:spec_decode_num_draft_tokens_total") > 0
        accepted = server.metric("tokenmill:spec_decode_num_accepted_tokens_total")
        assert accepted == server.engine.stats.spec_accepted_tokens
        assert server.metric("tokenmill:spec_decode_mean_accepted_length") >= 1.0
