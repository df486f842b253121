"""Online-serving metric maths, defined as vLLM's `benchmark_serving` defines them so numbers compare.

Pure functions over client-side timestamps (seconds, one monotonic clock), no I/O:
- TTFT: send → first chunk that carries text;
- ITL: gaps between consecutive text-carrying chunks of one request (pooled over all requests);
- TPOT: (E2E − TTFT) / (output_tokens − 1), only for requests with more than one output token;
- E2E latency: send → last text-carrying chunk.
Latencies are reported in milliseconds as mean, median, std (population) and percentiles (numpy's
linear interpolation); an empty sample reports 0.0, as vLLM does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request: when it was sent and when each text chunk arrived."""

    send_time: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    ok: bool = False
    error: str = ""

    @property
    def completed(self) -> bool:
        """Succeeded and produced at least one text chunk (so TTFT is defined)."""
        return self.ok and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        """Time to first token (s): send → first text chunk."""
        return self.chunk_times[0] - self.send_time

    @property
    def e2e_latency(self) -> float:
        """End-to-end latency (s): send → last text chunk."""
        return self.chunk_times[-1] - self.send_time

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies (s): gaps between consecutive text chunks."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (s); None when fewer than two tokens were produced."""
        if self.output_tokens <= 1:
            return None
        return (self.e2e_latency - self.ttft) / (self.output_tokens - 1)


def percentile_key(p: float) -> str:
    """`p99`, `p50`, `p99.9`: the key fragment vLLM uses for a percentile."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def latency_stats(name: str, seconds: Sequence[float], percentiles: Sequence[float] = (50, 99)) -> dict:
    """mean/median/std/percentiles of a sample in seconds, as `{stat}_{name}_ms` keys in milliseconds."""
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    empty = values.size == 0
    stats = {
        f"mean_{name}_ms": 0.0 if empty else float(np.mean(values)),
        f"median_{name}_ms": 0.0 if empty else float(np.median(values)),
        f"std_{name}_ms": 0.0 if empty else float(np.std(values)),
    }
    for p in percentiles:
        stats[f"{percentile_key(p)}_{name}_ms"] = 0.0 if empty else float(np.percentile(values, p))
    return stats


def meets_slo(
    record: RequestRecord,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    slo_e2e_ms: float | None = None,
) -> bool:
    """A completed request meets every SLO given; a one-token request counts as TPOT 0 (as in vLLM)."""
    if not record.completed:
        return False
    if slo_ttft_ms is not None and record.ttft * 1000.0 > slo_ttft_ms:
        return False
    if slo_tpot_ms is not None and (record.tpot or 0.0) * 1000.0 > slo_tpot_ms:
        return False
    return slo_e2e_ms is None or record.e2e_latency * 1000.0 <= slo_e2e_ms


def summarize(
    records: Sequence[RequestRecord],
    duration: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    slo_e2e_ms: float | None = None,
    percentiles: Sequence[float] = (50, 99),
) -> dict:
    """Throughputs, latency statistics and goodput of one benchmark run lasting `duration` seconds.

    Only completed requests count towards tokens, throughputs and latencies; failed ones are counted
    and their distinct error messages (at most ten) listed. `request_goodput` is the rate of requests
    meeting all given SLOs, or None when no SLO is given.
    """
    if duration <= 0:
        raise ValueError(f"duration must be positive seconds, got {duration}")
    done = [r for r in records if r.completed]
    failed = [r for r in records if not r.completed]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    slos = (slo_ttft_ms, slo_tpot_ms, slo_e2e_ms)
    goodput = None
    if any(s is not None for s in slos):
        goodput = sum(meets_slo(r, *slos) for r in done) / duration
    errors: list[str] = []
    for r in failed:
        message = r.error or "no text chunk received"
        if message not in errors and len(errors) < 10:
            errors.append(message)
    result = {
        "duration": duration,
        "completed": len(done),
        "failed": len(failed),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "request_goodput": goodput,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    samples = {
        "ttft": [r.ttft for r in done],
        "tpot": [t for r in done if (t := r.tpot) is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.e2e_latency for r in done],
    }
    for name in METRICS:
        result |= latency_stats(name, samples[name], percentiles)
    result["errors"] = errors
    return result


def arrival_times(
    num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Send offsets (s from the start) of `num_requests` requests: the first at 0, then gamma gaps.

    Gaps have mean 1/request_rate and shape `burstiness` (1 = Poisson arrivals; below 1 burstier,
    above 1 more even). `request_rate = inf` sends everything at once.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 requests/s (or inf), got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    if num_requests == 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
