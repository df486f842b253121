"""The online-benchmark maths on hand-made timestamps, and the arrival-time generator."""

import math

import numpy as np
import pytest

from tokenmill.bench.latency import RequestRecord, arrival_times, summarize

# send at t, text chunks at the listed times (seconds); hand-computed values in the comments (ms)
A = RequestRecord(10.0, [10.1, 10.3, 10.6], output_tokens=3, prompt_tokens=5, ok=True)  # TTFT 100, E2E 600,
# ITL 200 300, TPOT (600-100)/2 = 250
B = RequestRecord(20.0, [20.5], output_tokens=1, prompt_tokens=7, ok=True)  # TTFT 500, E2E 500, no TPOT/ITL
C = RequestRecord(30.0, [30.05], output_tokens=1, prompt_tokens=9, ok=False, error="HTTP 500: boom")
D = RequestRecord(40.0, [40.2, 40.4, 40.6, 40.8, 41.0], output_tokens=5, prompt_tokens=5, ok=True)
# TTFT 200, E2E 1000, ITL 200 x4, TPOT (1000-200)/4 = 200


def approx(value):
    return pytest.approx(value, rel=1e-9, abs=1e-6)


def test_per_request_ttft_itl_tpot_e2e_match_hand_computation():
    assert A.ttft == approx(0.1)
    assert A.e2e_latency == approx(0.6)
    assert A.itl == [approx(0.2), approx(0.3)]
    assert A.tpot == approx(0.25)
    assert B.tpot is None and B.itl == []
    assert D.tpot == approx(0.2)


def test_summary_counts_throughputs_and_latency_statistics():
    s = summarize([A, B, C, D], duration=4.0)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["total_input_tokens"] == 17 and s["total_output_tokens"] == 9
    assert s["request_throughput"] == approx(0.75)
    assert s["output_throughput"] == approx(2.25)
    assert s["total_token_throughput"] == approx(6.5)
    assert s["request_goodput"] is None
    # TTFT [100, 500, 200]
    assert s["mean_ttft_ms"] == approx(800 / 3)
    assert s["median_ttft_ms"] == approx(200) and s["p50_ttft_ms"] == approx(200)
    assert s["p99_ttft_ms"] == approx(200 + 0.98 * 300)  # linear interpolation between 200 and 500
    assert s["std_ttft_ms"] == approx(
        math.sqrt(((100 - 800 / 3) ** 2 + (500 - 800 / 3) ** 2 + (200 - 800 / 3) ** 2) / 3)
    )
    # TPOT [250, 200]: the one-token request has none
    assert s["mean_tpot_ms"] == approx(225) and s["p99_tpot_ms"] == approx(200 + 0.99 * 50)
    # ITL pooled over requests [200, 300, 200, 200, 200, 200]
    assert s["mean_itl_ms"] == approx(1300 / 6)
    assert s["median_itl_ms"] == approx(200) and s["p99_itl_ms"] == approx(200 + 0.95 * 100)
    # E2E [600, 500, 1000]
    assert s["mean_e2el_ms"] == approx(700) and s["median_e2el_ms"] == approx(600)
    assert s["p99_e2el_ms"] == approx(600 + 0.98 * 400)
    assert s["errors"] == ["HTTP 500: boom"]


def test_failed_requests_are_excluded_from_latencies_and_tokens():
    fast_failure = RequestRecord(0.0, [0.001, 0.002], output_tokens=1000, prompt_tokens=1000, ok=False)
    no_text = RequestRecord(0.0, [], output_tokens=0, prompt_tokens=3, ok=True)  # ok but TTFT undefined
    with_failures = summarize([A, B, D, fast_failure, no_text], duration=4.0)
    without = summarize([A, B, D], duration=4.0)
    assert with_failures["failed"] == 2 and without["failed"] == 0
    for key, value in without.items():
        if key not in ("failed", "errors"):
            assert with_failures[key] == value, key
    assert with_failures["errors"] == ["no text chunk received"]


def test_goodput_counts_requests_meeting_every_given_slo():
    records = [A, B, C, D]
    assert summarize(records, 4.0, slo_ttft_ms=250)["request_goodput"] == approx(2 / 4)  # A, D
    assert summarize(records, 4.0, slo_tpot_ms=220)["request_goodput"] == approx(2 / 4)  # B (TPOT 0), D
    assert summarize(records, 4.0, slo_ttft_ms=250, slo_tpot_ms=220)["request_goodput"] == approx(1 / 4)
    assert summarize(records, 4.0, slo_e2e_ms=700)["request_goodput"] == approx(2 / 4)  # A, B
    assert summarize(records, 4.0, slo_ttft_ms=0.001)["request_goodput"] == 0.0  # failed C never counts


def test_other_percentiles_and_an_empty_run():
    s = summarize([A, B, D], 4.0, percentiles=(90, 99.9))
    assert s["p90_ttft_ms"] == approx(float(np.percentile([100, 500, 200], 90)))
    assert "p99.9_itl_ms" in s and "p99_itl_ms" not in s
    empty = summarize([C], 1.0)
    assert empty["completed"] == 0 and empty["request_throughput"] == 0.0
    assert empty["mean_ttft_ms"] == 0.0 and empty["p99_e2el_ms"] == 0.0
    with pytest.raises(ValueError, match="duration"):
        summarize([A], 0.0)


def test_arrivals_are_reproducible_from_the_seed():
    first = arrival_times(100, 5.0, seed=7)
    assert first == arrival_times(100, 5.0, seed=7)
    assert first != arrival_times(100, 5.0, seed=8)
    assert first[0] == 0.0 and len(first) == 100
    assert all(b >= a for a, b in zip(first, first[1:], strict=False))


def test_mean_gap_is_one_over_the_rate():
    for rate, burstiness in ((10.0, 1.0), (2.0, 0.5), (50.0, 4.0)):
        gaps = np.diff(arrival_times(5000, rate, burstiness, seed=1))
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(6, math.inf) == [0.0] * 6
    assert arrival_times(0, 3.0) == []


def test_burstiness_changes_the_variance_of_gaps():
    # gamma(shape k, mean 1/r) has variance 1/(k r^2): k = 1 is Poisson (variance 1/r^2)
    variances = {k: np.diff(arrival_times(5000, 10.0, k, seed=2)).var() for k in (0.25, 1.0, 4.0)}
    for k, variance in variances.items():
        assert variance == pytest.approx(1 / (k * 100), rel=0.15)
    assert variances[0.25] > variances[1.0] > variances[4.0]


@pytest.mark.parametrize("kwargs", [{"request_rate": 0.0}, {"request_rate": -1.0}, {"burstiness": 0.0}])
def test_bad_arrival_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        arrival_times(10, **({"request_rate": 1.0} | kwargs))
