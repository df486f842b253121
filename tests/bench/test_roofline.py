"""Roofline formulas on hand-computed cases, and a smoke run of the command on a tiny model."""

import json
import subprocess
import sys

import pytest

from tokenmill.bench.roofline import crossover_batch, linear_shapes, parameter_counts, predict_decode_step
from tokenmill.config import ModelConfig
from tokenmill.kernels import kernel_isa

CFG = ModelConfig(
    architecture="llama",
    vocab_size=100,
    hidden_size=8,
    intermediate_size=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
)


def test_linear_shapes_follow_the_fused_layout():
    # qkv (2+1+1)*4=16 x 8, o 8 x 8, gate_up 32 x 8, down 8 x 16; twice; then the LM head 100 x 8.
    assert linear_shapes(CFG) == [(16, 8), (8, 8), (32, 8), (8, 16)] * 2 + [(100, 8)]
    assert parameter_counts(CFG) == (2 * (128 + 64 + 256 + 128) + 800,) * 2


def test_decode_step_prediction_by_hand():
    p = predict_decode_step(CFG, batch=4, context=10, bandwidth_gbs=1.0, gflops=1.0)
    params = 1952
    assert p.weight_bytes == params * 4
    kv_values = 4 * 10 * 2 * 2 * 1 * 4  # batch * context * layers * (K,V) * kv_heads * head_dim
    assert p.kv_bytes == kv_values * 4
    assert p.flops == 2 * 4 * params + 4 * 4 * 10 * 2 * 2 * 4
    assert p.memory_seconds == pytest.approx((params * 4 + kv_values * 4) / 1e9)
    assert p.compute_seconds == pytest.approx(p.flops / 1e9)
    assert p.bound_seconds == max(p.memory_seconds, p.compute_seconds)


def test_crossover_batch_formula():
    # 100 GFLOP/s over 25 GB/s = 4 FLOP per byte; fp32 (4 bytes) / 2 FLOPs per weight -> batch 8.
    assert crossover_batch(100.0, 25.0, 4.0) == pytest.approx(8.0)
    assert crossover_batch(100.0, 25.0, 1.0) == pytest.approx(2.0)  # int8 weights cross sooner
    assert crossover_batch(100.0, 25.0, 4.0, total_over_active=4.0) == pytest.approx(32.0)  # MoE


def test_roofline_command_smoke(tiny_models, tmp_path):
    folder = str(tiny_models["llama"][0])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenmill.cli",
            "bench",
            "roofline",
            "--model",
            folder,
            "--batches",
            "1,4",
            "--prompt-len",
            "16",
            "--steps",
            "3",
            "--quantization",
            "none,int8",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "roofline.json").read_text())
    assert report["kernels"] == kernel_isa()  # which build the numbers came from
    assert f"kernels: {kernel_isa()}" in (tmp_path / "roofline.md").read_text()
    assert [(r["format"], r["batch"]) for r in report["rows"]] == [
        ("fp32", 1),
        ("fp32", 4),
        ("int8", 1),
        ("int8", 4),
    ]
    for row in report["rows"]:
        assert row["measured_ms"] > 0 and row["roofline_ms"] > 0, row
        # The model's parts are each measured: the matmuls, attention and dispatch all cost something.
        assert row["linear_ms"] > 0 and row["attention_ms"] > 0 and row["dispatch_overhead_ms"] > 0, row
    fp32, int8 = report["rows"][0], report["rows"][2]
    assert int8["weight_mb"] < fp32["weight_mb"] / 2  # int8 weights are read, not fp32 copies
    assert (tmp_path / "roofline.png").stat().st_size > 1000
