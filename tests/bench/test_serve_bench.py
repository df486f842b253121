"""`tokenmill bench serve` end to end against a real tokenmill server on the tiny random model."""

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from tests.serve.conftest import running_server
from tokenmill.bench.serve import (
    add_parser,
    markdown_table,
    parse_rates,
    plot_latency_vs_rate,
    random_token_prompts,
    run_serve_benchmark,
    write_report,
)
from tokenmill.errors import InvalidParameterError
from tokenmill.models.loader import load_model


@pytest.fixture(scope="module")
def tiny_server(tiny_models):
    loaded = load_model(str(tiny_models["llama"][0]))
    with running_server(loaded) as server:
        server.vocab_size = loaded.config.vocab_size
        yield server


def test_benchmark_against_the_real_server_measures_every_request(tiny_server, tmp_path):
    prompts = random_token_prompts(8, 16, tiny_server.vocab_size, seed=0)
    result = asyncio.run(
        run_serve_benchmark(
            tiny_server.url,
            "tiny",
            prompts,
            8,
            request_rate=20,
            burstiness=1.0,
            seed=0,
            max_concurrency=4,
            slo={"slo_ttft_ms": 60_000},
            show_progress=False,
        )
    )
    assert (result["completed"], result["failed"]) == (8, 0), result["errors"]
    assert result["total_output_tokens"] == 8 * 8
    assert result["total_input_tokens"] == 8 * 16
    assert 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    assert result["p99_ttft_ms"] <= result["p99_e2el_ms"]
    assert result["mean_tpot_ms"] > 0 and result["mean_itl_ms"] > 0
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["request_rate"] == 20 and result["max_concurrency"] == 4

    json_path, md_path = write_report(result, tmp_path)
    assert json.loads(json_path.read_text())["completed"] == 8
    assert "TTFT p99 (ms)" in md_path.read_text()


def test_chat_endpoint_with_text_prompts(tiny_server):
    prompts = ["Hello there", "Why is the sky blue?"]
    run = run_serve_benchmark(
        tiny_server.url, "tiny", prompts, 6, endpoint="/v1/chat/completions", show_progress=False
    )
    result = asyncio.run(run)
    assert (result["completed"], result["failed"]) == (2, 0), result["errors"]
    assert result["total_output_tokens"] == 2 * 6
    assert result["total_input_tokens"] > 2 * 3  # from the server's usage: the chat template adds tokens


def test_failing_requests_are_counted_not_raised(tiny_server):
    prompts = random_token_prompts(3, 8, tiny_server.vocab_size, seed=1)
    run = run_serve_benchmark(tiny_server.url, "no-such-model", prompts, 4, warmup=False, show_progress=False)
    result = asyncio.run(run)
    assert (result["completed"], result["failed"]) == (0, 3)
    assert result["errors"][0].startswith("HTTP 404")
    with pytest.raises(InvalidParameterError, match="warm-up"):
        asyncio.run(run_serve_benchmark(tiny_server.url, "no-such-model", prompts, 4, show_progress=False))


def test_cli_sweeps_rates_and_writes_table_json_and_plot(tiny_server, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "serve",
            "--base-url",
            tiny_server.url,
            "--num-prompts",
            "4",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--request-rate",
            "50,100",
            "--request-rate",
            "inf",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert args.func(args) == 0
    assert "| rate 50/s | rate 100/s | rate inf/s |" in capsys.readouterr().out
    runs = json.loads((tmp_path / "serve.json").read_text())
    assert [r["request_rate"] for r in runs] == [50, 100, "inf"]
    assert all(r["model"] == "tiny" and r["completed"] == 4 for r in runs)  # model from GET /v1/models
    assert (tmp_path / "serve_latency_vs_rate.png").read_bytes()[:4] == b"\x89PNG"


def test_rate_parsing_and_plot_of_synthetic_runs(tmp_path):
    pytest.importorskip("matplotlib")
    assert parse_rates(["1", "2,4", "inf"]) == [1.0, 2.0, 4.0, float("inf")]
    with pytest.raises(InvalidParameterError):
        parse_rates(["0"])
    with pytest.raises(InvalidParameterError):
        parse_rates(["fast"])
    runs = [
        {
            "model": "m",
            "base_url": "u",
            "request_rate": rate,
            "p50_ttft_ms": rate,
            "p99_ttft_ms": 2 * rate,
            "p50_tpot_ms": 1.0,
            "p99_tpot_ms": 2.0,
        }
        for rate in (1.0, 4.0, float("inf"))
    ]
    path = plot_latency_vs_rate(runs, tmp_path / "plot.png")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError):
        plot_latency_vs_rate(runs[2:], tmp_path / "none.png")


def test_markdown_table_has_one_column_per_run():
    from tokenmill.bench.latency import RequestRecord, summarize

    base = summarize([RequestRecord(0.0, [0.1, 0.2], 2, 3, True)], 1.0)
    runs = [base | {"model": "m", "request_rate": r, "max_concurrency": None} for r in (2.0, float("inf"))]
    table = markdown_table(runs)
    assert table.splitlines()[0] == "| metric | rate 2/s | rate inf/s |"
    assert "| TTFT mean (ms) | 100.00 | 100.00 |" in table


def test_launch_tokenmill_starts_measures_and_stops_its_own_server(tiny_models, tmp_path):
    """`bench serve --launch tokenmill`: a real `tokenmill serve` child process on a free port."""
    import subprocess
    import sys

    folder = str(tiny_models["llama"][0])
    command = [sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--launch", "tokenmill"]
    command += ["--launch-model", folder, "--launch-threads", "1", "--num-prompts", "3", "--input-len", "8"]
    command += ["--output-len", "4", "--vocab-size", "1000", "--out-dir", str(tmp_path)]
    command += ["--launch-quantization", "int8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    url = next(line.split(" at ")[1] for line in result.stdout.splitlines() if line.startswith("launched"))
    run = json.loads((tmp_path / "serve.json").read_text())
    assert (run["completed"], run["failed"], run["total_output_tokens"]) == (3, 0, 12)
    assert run["base_url"] == url and run["model"] == folder  # served under its path
    import httpx

    with pytest.raises(httpx.ConnectError):  # stopped when the benchmark ended
        httpx.get(f"{url}/health", timeout=5)


def test_launch_llamacpp_needs_a_gguf(tiny_models):
    from tokenmill.bench.launch import launched_server

    with pytest.raises(InvalidParameterError, match="needs a GGUF"):
        with launched_server("llamacpp", str(tiny_models["llama"][0]), 1, 2, 32, Path("/tmp")):
            pass
