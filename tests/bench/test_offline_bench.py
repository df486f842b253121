"""Smoke runs of `tokenmill bench offline` and `bench speculative` on a tiny random model."""

import json
import subprocess
import sys

from tokenmill.kernels import kernel_isa


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "bench", *args], capture_output=True, text=True, timeout=600
    )


def test_offline_bench_runs_tokenmill_and_hf_side_by_side_and_writes_json_md_png(tiny_models, tmp_path):
    folder = str(tiny_models["qwen2"][0])
    result = _run(
        "offline",
        "--model",
        folder,
        "--num-prompts",
        "4",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--peers",
        "hf,llamacpp,vllm",
        "--no-vllm-install",
        "--vllm-venv",
        str(tmp_path / "no-vllm-here"),
        "--batch-sizes",
        "1,4",
        "--workloads",
        "random,shared-prefix,chat",
        "--out-dir",
        str(tmp_path),
        "--threads",
        "1",
        "--quantization",
        "none,int8+kv16",
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "offline.json").read_text())
    by_system = {(r["system"], r["scenario"].split(":")[0]): r for r in rows}
    for workload in ("random", "shared-prefix", "chat"):
        for system in ("tokenmill fp32", "tokenmill int8 (KV fp16)", "hf-transformers"):
            assert by_system[(system, workload)]["output_tokens"] == 32, (system, workload)
    assert by_system[("tokenmill fp32", "random")]["scenario"] == "random: 4 x 16 in / 8 out"
    assert by_system[("tokenmill fp32", "shared-prefix")]["scenario"] == "shared-prefix: 4 x 48 in / 8 out"
    # The host-overhead split: every step phase is timed, the model's share named in the note.
    phases = by_system[("tokenmill int8 (KV fp16)", "random")]["extra"]["phases"]
    assert {"schedule", "prepare", "model", "sample", "postprocess"} <= set(phases)
    assert "host overhead" in by_system[("tokenmill int8 (KV fp16)", "random")]["note"]
    assert f"kernels {kernel_isa()}" in by_system[("tokenmill fp32", "random")]["note"]  # which build ran
    # llama.cpp cannot run a safetensors folder: reported with the reason, not silently left out.
    llamacpp = [r for r in rows if r["system"].startswith("llama.cpp")]
    assert llamacpp and llamacpp[0]["note"].startswith("could not run")
    assert "| tokenmill int8 (KV fp16) |" in (tmp_path / "offline.md").read_text()
    vllm = [r for r in rows if r["system"].startswith("vLLM")]
    assert len(vllm) == 1 and "installing is disabled" in vllm[0]["note"]
    assert (tmp_path / "offline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads((tmp_path / "offline_sweep.json").read_text())
    assert [r["batch"] for r in sweep["rows"]] == [1, 4]
    assert all(r["measured_ms"] > 0 and r["roofline_ms"] > 0 for r in sweep["rows"])
    assert (tmp_path / "offline_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_offline_bench_samples_at_a_temperature_on_every_system(tiny_models, tmp_path):
    folder = str(tiny_models["llama"][0])
    common = ["offline", "--model", folder, "--num-prompts", "4", "--input-len", "16", "--output-len", "8"]
    common += ["--peers", "hf", "--threads", "1", "--out-dir", str(tmp_path)]
    result = _run(*common, "--temperature", "0.8")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "offline.json").read_text())
    batch = [r for r in rows if r["scenario"] != "single-stream decode"]
    assert {r["system"] for r in batch} == {"tokenmill fp32", "hf-transformers"}
    for row in batch:
        assert row["scenario"] == "random: 4 x 16 in / 8 out, temperature 0.8", row
        assert row["output_tokens"] == 32, row
    refused = _run(*common, "--temperature", "-1")
    assert refused.returncode != 0 and "temperature" in refused.stderr


def test_speculative_bench_reports_speedup_and_identical_output(tiny_models, tmp_path):
    folder = str(tiny_models["llama"][0])
    result = _run("speculative", "--model", folder, "--output-len", "12", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "speculative.json").read_text())
    assert {r["task"] for r in report["rows"]} == {"input-grounded", "chat"}
    assert all(r["identical_output"] for r in report["rows"])
    assert all(r["plain_tok_s"] > 0 and r["speculative_tok_s"] > 0 for r in report["rows"])
