"""Smoke test of the llama.cpp peer: a tiny workload through llama-server (xllamacpp) on the default GGUF.

Fails (does not skip) when xllamacpp cannot run, so a missing peer is visible. One llama.cpp thread:
with threads == cores, llama.cpp slows down by orders of magnitude when anything else competes for a core.
"""

from __future__ import annotations

import random

import pytest

from tokenmill.bench.llamacpp_peer import bench_llamacpp, bench_llamacpp_decode, llamacpp_available
from tokenmill.models.loader import default_model_path


@pytest.mark.bench
def test_llamacpp_peer_smoke():
    ok, reason = llamacpp_available()
    assert ok, f"llama.cpp peer unavailable: {reason}"
    gguf = str(default_model_path())
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(16)] for _ in range(4)]

    result = bench_llamacpp(
        gguf, prompts, output_len=8, threads=1, n_parallel=2, scenario="4 x 16 in / 8 out"
    )
    assert result.system == "llama.cpp (llama-server, n_parallel=2)"
    assert result.requests == 4
    assert result.output_tokens == 4 * 8
    assert result.seconds > 0 and result.tokens_per_second > 0
    assert result.extra["n_parallel"] == 2 and result.extra["n_ctx_per_slot"] >= 16 + 8
    assert "Q4_1" in result.note

    decode = bench_llamacpp_decode(gguf, prompts[0], output_len=8, threads=1)
    assert decode.scenario == "single-stream decode"
    assert decode.output_tokens == 8 - 1
    assert decode.seconds > 0 and decode.tokens_per_second > 0
    assert decode.extra["timings"]["predicted_n"] == 8
