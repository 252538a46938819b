"""Unit tests of worker.lag.LagReport: the lag timer against a rebalance.

The timer reads the consumer's assignment, then asks for each partition's highwater and position.
A rebalance may revoke a partition between those calls: aiokafka's ``highwater`` then fails its
``is_assigned`` assertion and ``position`` raises ``IllegalStateError``. The fake consumer below
answers exactly as aiokafka does for a partition it no longer holds.
"""

from __future__ import annotations

import pytest
from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from worker.lag import LagReport
from worker.metrics import WorkerMetrics

pytestmark = pytest.mark.unit

TOPIC = "req-lag"
KEPT, REVOKED = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


class RevokingConsumer:
    """Holds ``KEPT`` and ``REVOKED``; ``REVOKED`` goes away right after ``assignment()``."""

    def __init__(self, *, revoked_before: str) -> None:
        #: "highwater" or "position": the first call that no longer finds the partition.
        self.revoked_before = revoked_before
        self.calls: list[str] = []

    def assignment(self) -> set[TopicPartition]:
        self.calls.append("assignment")
        return {KEPT, REVOKED}

    def highwater(self, tp: TopicPartition) -> int:
        self.calls.append("highwater")
        if tp == REVOKED and self.revoked_before == "highwater":
            raise AssertionError("Partition is not assigned")  # aiokafka's own check
        return 10

    async def position(self, tp: TopicPartition) -> int:
        self.calls.append("position")
        if tp == REVOKED:
            raise IllegalStateError(f"Partition {tp} is not assigned")
        return 7


def lag_report(registry: CollectorRegistry) -> LagReport:
    # Nothing pending: the lag is read from the consumer's position.
    return LagReport(TOPIC, lambda _tp: None, WorkerMetrics(registry))


def lag(registry: CollectorRegistry, tp: TopicPartition) -> float | None:
    return registry.get_sample_value("chat_worker_consumer_lag", {"partition": str(tp.partition)})


@pytest.mark.parametrize("revoked_before", ["highwater", "position"])
async def test_a_partition_revoked_while_the_lag_is_read_is_skipped(revoked_before: str) -> None:
    """The revoked partition gets no lag and raises nothing; the kept one is reported."""
    registry = CollectorRegistry()
    consumer = RevokingConsumer(revoked_before=revoked_before)
    await lag_report(registry).report(consumer)
    assert lag(registry, KEPT) == 3
    assert lag(registry, REVOKED) is None


async def test_no_lag_is_read_while_the_app_is_rebalancing() -> None:
    """During a rebalance the timer leaves the consumer alone: no assignment, no positions."""
    registry = CollectorRegistry()
    consumer = RevokingConsumer(revoked_before="position")
    await lag_report(registry).report(consumer, paused=True)
    assert consumer.calls == []
    assert lag(registry, KEPT) is None
