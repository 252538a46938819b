"""The worker's Prometheus metrics, created against a registry passed in (never the global one).

Names are a contract (docs/design.md §12): dashboards, alert rules and the HPA read them. Every
label has a bounded set of values; the sets below are pre-initialised so that each series shows
as 0 from the first scrape, and ``rate()`` sees the first increment.

    chat_worker_requests_total{outcome}          completed | failed | expired | cancelled |
                                                 invalid | duplicate
    chat_worker_cancels_total{effect}            chat.cancel.v1 records: "cancelled" when they
                                                 cancelled a request, "none" when nothing matched
    chat_worker_cancel_seconds                   cancel taken → its streaming request's Vapi call
                                                 closed
    chat_worker_internal_errors_total            requests ended by an unplanned exception (a bug)
    chat_worker_deltas_total                     deltas published to the delta topic
    chat_worker_in_flight                        Vapi streams open now
    chat_worker_buffered                         records taken from Kafka and not finished
    chat_worker_time_to_first_delta_seconds      request start → first delta
    chat_worker_request_duration_seconds         request start → final response published
    chat_worker_queue_wait_seconds               record taken → request started
    chat_worker_delta_publish_seconds            SSE event received → Kafka ack of its delta
    chat_worker_vapi_responses_total{status}     HTTP status as a string, or "error" (no response);
                                                 VAPI_STATUSES pre-initialised
    chat_worker_retries_total{reason}            see RETRY_REASONS
    chat_worker_dlq_total{reason}                see DLQ_REASONS ("other" for anything else)
    chat_worker_malformed_events_total           SSE events that could not be decoded
    chat_worker_recovery_stalls_total            table recoveries that stopped progressing for
                                                 WORKER_RECOVERY_STALL_S (the process then exits)
    chat_worker_consumer_lag{partition}          high watermark - lowest unfinished offset, per
                                                 partition (the position when none is pending)
    chat_worker_vapi_ready                       0 after Vapi rejected the key (401/403), else 1
    chat_worker_broker_reachable                 1 when the last broker metadata request succeeded
    chat_worker_vapi_backoff_seconds             seconds left of the worker-wide pause after a 429
    chat_worker_concurrency_limit                requests this worker may run at once now: the
                                                 least of WORKER_MAX_IN_FLIGHT, its fleet share,
                                                 and the limit 429s cut it to (worker.aimd)
    chat_worker_fleet_stream_share               its share of VAPI_GLOBAL_MAX_IN_FLIGHT (0: off)
    chat_worker_fleet_requests_per_minute_share  its share of VAPI_GLOBAL_REQUESTS_PER_MINUTE
                                                 (0: off)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from worker.messages import InvalidReason

#: Values of ``outcome`` on ``chat_worker_requests_total``.
OUTCOMES: Final = ("completed", "failed", "expired", "cancelled", "invalid", "duplicate")

#: Values of ``effect`` on ``chat_worker_cancels_total``.
CANCEL_EFFECTS: Final = ("cancelled", "none")

#: Buckets of ``chat_worker_cancel_seconds``: a cancel closes a stream in milliseconds; one
#: second is the contract (docs/design.md §5.8).
CANCEL_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: Values of ``kind`` on ``chat_worker_tokens_total``.
TOKEN_KINDS: Final = ("prompt", "completion")

#: Values of ``result`` on ``chat_worker_reply_checks_total``.
REPLY_CHECK_RESULTS: Final = ("complete", "incomplete", "unchecked")

#: Values of ``status`` on ``chat_worker_vapi_responses_total`` exported from the start: the
#: answers the worker tells apart (docs/design.md §6) and the usual proxy statuses. Any other
#: status Vapi sends gets its series at its first occurrence, which ``rate()`` cannot see.
VAPI_STATUSES: Final = (
    "200",
    "400",
    "401",
    "403",
    "404",
    "408",
    "409",
    "413",
    "422",
    "429",
    "500",
    "502",
    "503",
    "504",
    "error",
)

#: Values of ``reason`` on ``chat_worker_retries_total``; "other" catches a retryable error of a
#: kind added later, so the label stays bounded.
RETRY_REASONS: Final = (
    "rate_limited",
    "server_error",
    "connect",
    "timeout",
    "stream_broken",
    "context_reset",
    "other",
)

#: Values of ``reason`` on ``chat_worker_dlq_total``: the reason codes of ``InvalidRequestError``
#: (``worker.messages.INVALID_REASONS`` plus the worker's own assistant allowlist check).
#: ``dlq_reason()`` maps any other code to "other", so a new code cannot grow the series count.
DLQ_REASONS: Final = (*get_args(InvalidReason), "assistant_not_allowed", "other")

#: Time to first delta and whole-request duration of an LLM stream: tens of ms to minutes.
STREAM_BUCKETS_S: Final = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    180.0,
    300.0,
)

#: Wait between taking a record and starting it: ~0 when idle, minutes under backpressure.
QUEUE_BUCKETS_S: Final = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

#: SSE receipt → Kafka ack of one delta: milliseconds normally, seconds when the broker struggles.
PUBLISH_BUCKETS_S: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

PREFIX: Final = "chat_worker"


def dlq_reason(reason: str) -> str:
    """The bounded ``reason`` label value for a dead-letter reason code."""
    return reason if reason in DLQ_REASONS else "other"


class WorkerMetrics:
    """Every metric the worker exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests_total = Counter(
            f"{PREFIX}_requests_total",
            "Requests finished, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.cancels_total = Counter(
            f"{PREFIX}_cancels_total",
            "chat.cancel.v1 records taken, by whether they cancelled a request.",
            ["effect"],
            registry=registry,
        )
        self.cancel_seconds = Histogram(
            f"{PREFIX}_cancel_seconds",
            "Time from taking a cancel to the end of its streaming request's Vapi call.",
            buckets=CANCEL_BUCKETS_S,
            registry=registry,
        )
        self.internal_errors_total = Counter(
            f"{PREFIX}_internal_errors_total",
            "Requests (and unreadable records) ended by an exception nobody planned for, a bug.",
            registry=registry,
        )
        self.deltas_total = Counter(
            f"{PREFIX}_deltas_total", "Deltas published to the delta topic.", registry=registry
        )
        self.in_flight = Gauge(f"{PREFIX}_in_flight", "Vapi streams in flight.", registry=registry)
        self.buffered = Gauge(
            f"{PREFIX}_buffered",
            "Records taken from Kafka and not finished (waiting or in flight).",
            registry=registry,
        )
        self.time_to_first_delta_seconds = Histogram(
            f"{PREFIX}_time_to_first_delta_seconds",
            "Time from the start of a request to its first delta.",
            buckets=STREAM_BUCKETS_S,
            registry=registry,
        )
        self.request_duration_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from the start of a request to its final response, retries included.",
            buckets=STREAM_BUCKETS_S,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time from taking a record to starting its request.",
            buckets=QUEUE_BUCKETS_S,
            registry=registry,
        )
        self.delta_publish_seconds = Histogram(
            f"{PREFIX}_delta_publish_seconds",
            "Time from receiving an SSE event to Kafka acknowledging its delta.",
            buckets=PUBLISH_BUCKETS_S,
            registry=registry,
        )
        self.vapi_responses_total = Counter(
            f"{PREFIX}_vapi_responses_total",
            'Vapi HTTP responses by status code ("error" when no response came back).',
            ["status"],
            registry=registry,
        )
        self.retries_total = Counter(
            f"{PREFIX}_retries_total",
            "Vapi calls retried, by reason.",
            ["reason"],
            registry=registry,
        )
        self.dlq_total = Counter(
            f"{PREFIX}_dlq_total",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=registry,
        )
        self.malformed_events_total = Counter(
            f"{PREFIX}_malformed_events_total",
            "SSE events from Vapi that could not be decoded.",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag",
            "Records behind the end of each assigned request partition.",
            ["partition"],
            registry=registry,
        )
        self.conversations = Gauge(
            f"{PREFIX}_conversations",
            "Conversations in this worker's chat-state table (the partitions it owns).",
            registry=registry,
        )
        self.conversations_expired_total = Counter(
            f"{PREFIX}_conversations_expired_total",
            "Idle conversations deleted from the chat-state table (tombstone written).",
            registry=registry,
        )
        self.recovery_stalls_total = Counter(
            f"{PREFIX}_recovery_stalls_total",
            "Table recoveries without progress for WORKER_RECOVERY_STALL_S; the process exits.",
            registry=registry,
        )
        self.vapi_ready = Gauge(
            f"{PREFIX}_vapi_ready",
            "0 after Vapi rejected the API key (401/403), 1 otherwise (also before any call).",
            registry=registry,
        )
        # Not known to be bad until Vapi says so, like the reported dependency vapi_auth.
        self.vapi_ready.set(1)
        self.broker_reachable = Gauge(
            f"{PREFIX}_broker_reachable",
            "1 when the last metadata request to the Kafka cluster (every 10 s) succeeded, else 0.",
            registry=registry,
        )
        self.vapi_backoff_seconds = Gauge(
            f"{PREFIX}_vapi_backoff_seconds",
            "Seconds left of the pause a 429 put on every Vapi call of this worker (0: none).",
            registry=registry,
        )
        self.concurrency_limit = Gauge(
            f"{PREFIX}_concurrency_limit",
            "Requests this worker may run at once now: the least of WORKER_MAX_IN_FLIGHT, its "
            "share of VAPI_GLOBAL_MAX_IN_FLIGHT and the limit 429s cut it to.",
            registry=registry,
        )
        self.fleet_stream_share = Gauge(
            f"{PREFIX}_fleet_stream_share",
            "This worker's share of VAPI_GLOBAL_MAX_IN_FLIGHT, from the request partitions it "
            "owns (0 when the setting is off).",
            registry=registry,
        )
        self.fleet_requests_per_minute_share = Gauge(
            f"{PREFIX}_fleet_requests_per_minute_share",
            "This worker's share of VAPI_GLOBAL_REQUESTS_PER_MINUTE, from the request partitions "
            "it owns (0 when the setting is off).",
            registry=registry,
        )
        self.cost_usd_total = Counter(
            f"{PREFIX}_cost_usd",
            "USD Vapi billed for completed replies (each chat's cost, from GET /chat/{id}).",
            registry=registry,
        )
        self.tokens_total = Counter(
            f"{PREFIX}_tokens",
            "Model tokens of completed replies (the chats' model costs), by kind.",
            ["kind"],
            registry=registry,
        )
        self.reply_checks_total = Counter(
            f"{PREFIX}_reply_checks",
            "Completed replies checked against the chat's output, by result.",
            ["result"],
            registry=registry,
        )
        for kind in TOKEN_KINDS:
            self.tokens_total.labels(kind=kind)
        for result in REPLY_CHECK_RESULTS:
            self.reply_checks_total.labels(result=result)
        for outcome in OUTCOMES:
            self.requests_total.labels(outcome=outcome)
        for effect in CANCEL_EFFECTS:
            self.cancels_total.labels(effect=effect)
        for status in VAPI_STATUSES:
            self.vapi_responses_total.labels(status=status)
        for reason in RETRY_REASONS:
            self.retries_total.labels(reason=reason)
        for reason in DLQ_REASONS:
            self.dlq_total.labels(reason=reason)

    def watch_backoff(self, remaining_s: Callable[[], float]) -> None:
        """Read ``chat_worker_vapi_backoff_seconds`` from ``remaining_s`` at every scrape."""
        self.vapi_backoff_seconds.set_function(remaining_s)

    def count_dead_letter(self, reason: str) -> None:
        """Count one record sent to the DLQ, with its reason code bounded by ``dlq_reason``."""
        self.dlq_total.labels(reason=dlq_reason(reason)).inc()

    def set_consumer_lag(self, partition: int, lag: int) -> None:
        """Set the lag of one assigned request partition (never below 0)."""
        self.consumer_lag.labels(partition=str(partition)).set(max(lag, 0))

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        """Drop the lag series of revoked partitions, so another worker's value stands alone."""
        for partition in partitions:
            self.consumer_lag.remove(str(partition))


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text exposition format (version 0.0.4)."""
    return generate_latest(registry)
