"""The offline benchmark's picture: output tokens/s of every system, one panel per workload."""

from __future__ import annotations

from pathlib import Path

from tokenmill.bench.offline import BenchResult


def plot_throughput(results: list[BenchResult], path: str | Path) -> Path:
    """Horizontal bars of tok/s per system, one panel per scenario; systems that could not run are
    listed in the panel as 'not run' so the picture shows them too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r.scenario for r in results if r.scenario != "all"))
    failed = list(dict.fromkeys(r.system for r in results if r.seconds <= 0))
    figure, axes = plt.subplots(
        len(scenarios) or 1, 1, figsize=(9, 1.2 + 0.45 * _rows(results, scenarios)), squeeze=False
    )
    for axis, scenario in zip(axes[:, 0], scenarios or ["(no results)"], strict=True):
        rows = [r for r in results if r.scenario == scenario and r.seconds > 0]
        labels = [r.system for r in rows] + [f"{name} (not run)" for name in failed]
        values = [r.tokens_per_second for r in rows] + [0.0] * len(failed)
        colors = ["tab:blue" if r.system.startswith("tokenmill") else "tab:gray" for r in rows]
        bars = axis.barh(labels, values, color=colors + ["white"] * len(failed), edgecolor="black", lw=0.5)
        axis.bar_label(bars, labels=[f"{v:.1f}" if v else "" for v in values], padding=3, fontsize=8)
        axis.invert_yaxis()
        axis.set_title(scenario, fontsize=10)
        axis.set_xlabel("output tokens / s")
        axis.margins(x=0.15)
        axis.tick_params(axis="y", labelsize=8)
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _rows(results: list[BenchResult], scenarios: list[str]) -> int:
    failed = len({r.system for r in results if r.seconds <= 0})
    return sum(sum(1 for r in results if r.scenario == s and r.seconds > 0) + failed + 1 for s in scenarios)
