"""The worker's metrics: names (a contract), pre-initialised labels, buckets, helpers."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import (
    DLQ_REASONS,
    OUTCOMES,
    REPLY_CHECK_RESULTS,
    RETRY_REASONS,
    TOKEN_KINDS,
    VAPI_STATUSES,
    WorkerMetrics,
    dlq_reason,
    render,
)

pytestmark = pytest.mark.unit

#: docs/design.md §12 plus the extras this module adds; dashboards and alerts depend on these names.
CONTRACT = {
    "chat_worker_requests": "counter",
    "chat_worker_internal_errors": "counter",
    "chat_worker_deltas": "counter",
    "chat_worker_in_flight": "gauge",
    "chat_worker_buffered": "gauge",
    "chat_worker_time_to_first_delta_seconds": "histogram",
    "chat_worker_request_duration_seconds": "histogram",
    "chat_worker_queue_wait_seconds": "histogram",
    "chat_worker_delta_publish_seconds": "histogram",
    "chat_worker_vapi_responses": "counter",
    "chat_worker_retries": "counter",
    "chat_worker_dlq": "counter",
    "chat_worker_malformed_events": "counter",
    "chat_worker_consumer_lag": "gauge",
    "chat_worker_vapi_ready": "gauge",
    "chat_worker_broker_reachable": "gauge",
    "chat_worker_vapi_backoff_seconds": "gauge",
    "chat_worker_conversations": "gauge",
    "chat_worker_conversations_expired": "counter",
    "chat_worker_recovery_stalls": "counter",
    "chat_worker_concurrency_limit": "gauge",
    "chat_worker_fleet_stream_share": "gauge",
    "chat_worker_fleet_requests_per_minute_share": "gauge",
    "chat_worker_cost_usd": "counter",
    "chat_worker_tokens": "counter",
    "chat_worker_reply_checks": "counter",
    "chat_worker_cancels": "counter",
    "chat_worker_cancel_seconds": "histogram",
}


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry per test, never the global one."""
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> WorkerMetrics:
    """The worker's metrics on the fresh registry."""
    return WorkerMetrics(registry)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """The current value of one sample, or None when the series does not exist."""
    return registry.get_sample_value(name, labels)


def test_exports_exactly_the_contracted_families(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    """The registry holds every metric family of the contract, with its type, and no other."""
    families = {family.name: family.type for family in registry.collect()}
    assert families == CONTRACT


def test_labelled_counters_start_at_zero(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    """Every outcome, Vapi status, retry reason and DLQ reason is exported as 0 before anything
    happens, so that rate() sees the first of each (a series born at 1 shows no increase)."""
    for outcome in OUTCOMES:
        assert sample(registry, "chat_worker_requests_total", outcome=outcome) == 0
    for status in VAPI_STATUSES:
        assert sample(registry, "chat_worker_vapi_responses_total", status=status) == 0
    # Every status the worker handles apart: success, auth, rate limit, context reset, 5xx.
    assert {"200", "400", "401", "403", "404", "429", "500", "503", "error"} <= set(VAPI_STATUSES)
    for reason in RETRY_REASONS:
        assert sample(registry, "chat_worker_retries_total", reason=reason) == 0
    for reason in DLQ_REASONS:
        assert sample(registry, "chat_worker_dlq_total", reason=reason) == 0
    for kind in TOKEN_KINDS:
        assert sample(registry, "chat_worker_tokens_total", kind=kind) == 0
    for result in REPLY_CHECK_RESULTS:
        assert sample(registry, "chat_worker_reply_checks_total", result=result) == 0
    assert sample(registry, "chat_worker_cost_usd_total") == 0


def test_vapi_backoff_is_read_from_the_gate_at_each_scrape(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    """0 until a gate is watched; then whatever the gate says is left of its pause, live."""
    assert sample(registry, "chat_worker_vapi_backoff_seconds") == 0
    left = [12.5]
    metrics.watch_backoff(lambda: left[0])
    assert sample(registry, "chat_worker_vapi_backoff_seconds") == 12.5
    left[0] = 0.0
    assert sample(registry, "chat_worker_vapi_backoff_seconds") == 0


def test_vapi_ready_starts_at_one(registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
    """Before any call the key is not known to be bad, so an idle worker does not alert."""
    assert sample(registry, "chat_worker_vapi_ready") == 1


def test_outcomes_and_retry_reasons_match_the_contract() -> None:
    """The label sets are the ones dashboards and the pipeline use."""
    assert set(OUTCOMES) == {"completed", "failed", "expired", "cancelled", "invalid", "duplicate"}
    assert {
        "rate_limited",
        "server_error",
        "connect",
        "timeout",
        "stream_broken",
        "context_reset",
    } <= set(RETRY_REASONS)


def test_stream_histograms_span_tens_of_ms_to_minutes(metrics: WorkerMetrics) -> None:
    """Time to first delta and request duration have buckets from ≤ 50 ms to ≥ 2 minutes."""
    for histogram in (metrics.time_to_first_delta_seconds, metrics.request_duration_seconds):
        bounds = histogram._upper_bounds  # the only place prometheus-client keeps them
        assert bounds[0] <= 0.05
        assert max(b for b in bounds if b != float("inf")) >= 120


def test_delta_publish_histogram_resolves_milliseconds(metrics: WorkerMetrics) -> None:
    """Delta publish latency has sub-millisecond to second buckets."""
    bounds = metrics.delta_publish_seconds._upper_bounds
    assert bounds[0] <= 0.001
    assert max(b for b in bounds if b != float("inf")) >= 1


def test_observations_land_in_the_registry(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    """Incrementing and observing through the attributes shows up under the contracted names."""
    metrics.requests_total.labels(outcome="completed").inc()
    metrics.deltas_total.inc(3)
    metrics.in_flight.set(2)
    metrics.time_to_first_delta_seconds.observe(0.3)
    metrics.vapi_ready.set(0)
    assert sample(registry, "chat_worker_requests_total", outcome="completed") == 1
    assert sample(registry, "chat_worker_deltas_total") == 3
    assert sample(registry, "chat_worker_in_flight") == 2
    assert sample(registry, "chat_worker_time_to_first_delta_seconds_count") == 1
    assert sample(registry, "chat_worker_time_to_first_delta_seconds_bucket", le="0.5") == 1
    assert sample(registry, "chat_worker_vapi_ready") == 0


def test_dead_letter_reasons_stay_bounded(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    """A reason code outside DLQ_REASONS is counted as "other", a known one as itself."""
    metrics.count_dead_letter("not_json")
    metrics.count_dead_letter("some_new_code")
    assert dlq_reason("some_new_code") == "other"
    assert sample(registry, "chat_worker_dlq_total", reason="not_json") == 1
    assert sample(registry, "chat_worker_dlq_total", reason="other") == 1
    assert sample(registry, "chat_worker_dlq_total", reason="some_new_code") is None


def test_consumer_lag_per_partition_and_forgotten_on_revoke(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    """Lag is set per partition, clamped at 0, and its series disappears when revoked."""
    metrics.set_consumer_lag(3, 42)
    metrics.set_consumer_lag(5, -1)
    assert sample(registry, "chat_worker_consumer_lag", partition="3") == 42
    assert sample(registry, "chat_worker_consumer_lag", partition="5") == 0
    metrics.forget_partitions({3, 7})
    assert sample(registry, "chat_worker_consumer_lag", partition="3") is None
    assert sample(registry, "chat_worker_consumer_lag", partition="5") == 0


def test_two_instances_use_their_own_registries() -> None:
    """Creating the metrics twice on fresh registries works and leaves the global one alone."""
    first, second = WorkerMetrics(CollectorRegistry()), WorkerMetrics(CollectorRegistry())
    first.deltas_total.inc()
    assert second.registry.get_sample_value("chat_worker_deltas_total") == 0
    assert REGISTRY.get_sample_value("chat_worker_deltas_total") is None


def test_render_is_parseable_text_format(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    """``render`` yields the text format that Prometheus' own parser reads back."""
    metrics.retries_total.labels(reason="timeout").inc()
    text = render(registry).decode()
    families = {family.name for family in text_string_to_metric_families(text)}
    assert set(CONTRACT) <= families
    assert 'chat_worker_retries_total{reason="timeout"} 1.0' in text


def test_every_dead_letter_reason_code_has_its_own_series() -> None:
    """Each reason code that message decoding can raise is pre-initialised, not lumped as other."""
    from worker.messages import INVALID_REASONS

    assert set(INVALID_REASONS) <= set(DLQ_REASONS)
