"""`bench offline --batch-sizes`: tokenmill's decode step time and tok/s against batch size, beside the
roofline bound, so the offline numbers can be read against what the machine allows at each batch."""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.bench.roofline import measure_decode_steps, measure_machine, predict_decode_step
from tokenmill.engine.engine import LLMEngine


def run_batch_sweep(engine: LLMEngine, batches: tuple[int, ...], prompt_len: int, steps: int = 8) -> dict:
    """Measured pure-decode step time at each batch size and the roofline bound
    max(bytes / read bandwidth, FLOPs / peak matmul FLOP/s) for the same step."""
    cfg = engine.model_config
    threads = engine.config.resolved_threads()
    machine = measure_machine(cfg, threads, tuple(sorted(set(batches) | {256})))
    measured = measure_decode_steps(engine, batches, prompt_len, steps)
    context = prompt_len + steps // 2 + 1
    rows = []
    for batch in batches:
        bound = predict_decode_step(cfg, batch, context, machine.read_gbs, machine.peak_gflops)
        rows.append(
            {
                "batch": batch,
                "measured_ms": measured[batch] * 1e3,
                "measured_tok_s": batch / measured[batch],
                "roofline_ms": bound.bound_seconds * 1e3,
                "roofline_tok_s": bound.tokens_per_second,
                "memory_ms": bound.memory_seconds * 1e3,
                "compute_ms": bound.compute_seconds * 1e3,
                "achieved_pct_of_roofline": 100 * bound.bound_seconds / measured[batch],
            }
        )
    return {
        "model": cfg.name,
        "threads": threads,
        "context": context,
        "read_gbs": machine.read_gbs,
        "peak_gflops": machine.peak_gflops,
        "rows": rows,
    }


def markdown_table(sweep: dict) -> str:
    lines = [
        f"Decode steps at context {sweep['context']}, {sweep['threads']} threads; roofline from "
        f"{sweep['read_gbs']:.1f} GB/s and {sweep['peak_gflops']:.0f} GFLOP/s.",
        "",
        "| batch | step ms | tok/s | roofline ms | roofline tok/s | achieved |",
        "|---|---|---|---|---|---|",
    ]
    for r in sweep["rows"]:
        lines.append(
            f"| {r['batch']} | {r['measured_ms']:.1f} | {r['measured_tok_s']:.1f} | {r['roofline_ms']:.1f} | "
            f"{r['roofline_tok_s']:.1f} | {r['achieved_pct_of_roofline']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def plot_batch_sweep(sweep: dict, path: str | Path) -> Path:
    """Two panels against batch size: step time (measured, bound, its memory and compute parts) and tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep["rows"]
    batches = [r["batch"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(batches, [r["measured_ms"] for r in rows], "o-", label="tokenmill measured")
    left.plot(batches, [r["roofline_ms"] for r in rows], "k--", label="roofline bound")
    left.plot(batches, [r["memory_ms"] for r in rows], ":", label="bytes / bandwidth")
    left.plot(batches, [r["compute_ms"] for r in rows], ":", label="FLOPs / peak")
    left.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode step (ms)", title="Step time")
    left.legend(fontsize=8)
    right.plot(batches, [r["measured_tok_s"] for r in rows], "o-", label="tokenmill measured")
    right.plot(batches, [r["roofline_tok_s"] for r in rows], "k--", label="roofline bound")
    right.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens / s", title="Decode throughput")
    right.legend(fontsize=8)
    figure.suptitle(f"{sweep['model']} decode on {sweep['threads']} threads (fp32)")
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def write_sweep(sweep: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "offline_sweep.json").write_text(json.dumps(sweep, indent=2))
    (out_dir / "offline_sweep.md").write_text(markdown_table(sweep))
    plot_batch_sweep(sweep, out_dir / "offline_sweep.png")
