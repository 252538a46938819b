"""bench.probes.summarize: what the kubelet would have made of a run's polls."""

from __future__ import annotations

import pytest

from bench.probes import ERROR, REFUSED, TIMEOUT, Sample, passed, percentile, summarize


def test_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]  # 1..100, given out of order below
    shuffled = values[50:] + values[:50]
    assert percentile(shuffled, 0.50) == 50.0
    assert percentile(shuffled, 0.99) == 99.0
    assert percentile(shuffled, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


@pytest.mark.parametrize(
    ("status", "latency_s", "ok"),
    [
        (200, 0.01, True),
        (302, 0.01, True),  # the kubelet takes 2xx and 3xx
        (200, 3.0, True),  # at the timeout still counts
        (200, 3.01, False),  # answered, but after the probe gave up
        (503, 0.01, False),
        (REFUSED, 0.001, False),
        (TIMEOUT, 10.0, False),
        (ERROR, 0.1, False),
    ],
)
def test_passed_is_2xx_or_3xx_within_the_timeout(
    status: int | str, latency_s: float, ok: bool
) -> None:
    assert passed(Sample(1.0, status, latency_s), 3.0) is ok


def test_refused_before_the_server_listens_is_not_a_failure_after_it_is_up() -> None:
    samples = [Sample(t / 10, REFUSED, 0.001) for t in range(10)]
    samples += [Sample(1.0 + t / 10, 200, 0.005) for t in range(10)]
    summary = summarize("/healthz", samples, 3.0)
    assert summary.polls == 20
    assert summary.statuses == {"200": 10, "refused": 10}
    assert summary.first_ok_s == 1.0
    assert summary.longest_failing_s == 0.0
    assert summary.most_failures_in_row == 0
    # Refused polls never reached the server: not among the latencies.
    assert summary.p50_ms == summary.max_ms == 5.0
    assert summary.slower_than_timeout == 0


def test_slow_answers_after_the_first_ok_are_failures_spanning_until_the_next_pass() -> None:
    samples = [
        Sample(0.0, REFUSED, 0.001),
        Sample(1.0, 200, 0.010),
        Sample(2.0, 200, 4.000),  # the event loop stalled: too slow for a 3 s probe
        Sample(6.0, TIMEOUT, 10.0),
        Sample(16.0, 200, 0.020),
        Sample(17.0, 503, 0.010),
        Sample(18.0, 200, 0.010),
    ]
    summary = summarize("/healthz", samples, 3.0)
    assert summary.first_ok_s == 1.0
    assert summary.most_failures_in_row == 2
    assert summary.longest_failing_s == 14.0  # from 2.0 until the pass at 16.0
    assert summary.slower_than_timeout == 2
    assert summary.max_ms == 10_000.0
    assert summary.slowest_at_s == 6.0
    assert summary.statuses == {"200": 4, "503": 1, "refused": 1, "timeout": 1}


def test_a_failure_at_the_end_lasts_until_its_answer() -> None:
    samples = [Sample(0.0, 200, 0.01), Sample(1.0, 200, 0.01), Sample(2.0, 503, 0.5)]
    summary = summarize("/readyz", samples, 3.0)
    assert summary.longest_failing_s == 0.5
    assert summary.most_failures_in_row == 1


def test_never_ok() -> None:
    summary = summarize("/readyz", [Sample(0.0, 503, 0.01), Sample(1.0, REFUSED, 0.0)], 3.0)
    assert summary.first_ok_s is None
    assert summary.longest_failing_s == 0.0
    assert summary.p50_ms == summary.p99_ms == 10.0
    assert summary.statuses == {"503": 1, "refused": 1}


def test_no_polls() -> None:
    summary = summarize("/healthz", [], 3.0)
    assert summary.polls == 0
    assert summary.p50_ms is None
    assert summary.slowest_at_s is None
    assert summary.max_ms is None
    assert summary.first_ok_s is None
