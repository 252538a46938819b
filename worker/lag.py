"""``chat_worker_consumer_lag``: per partition, the records not finished yet (docs/design.md §4.5).

Every few seconds the lag of each assigned request partition is its high watermark minus its
lowest unfinished offset (or, with nothing pending, the consumer's position). Series of partitions
this worker lets go of are removed (``forget``), so only the partition's owner reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Protocol

from aiokafka.errors import IllegalStateError

from worker.lifecycle import PartitionId
from worker.metrics import WorkerMetrics


class LagSource(Protocol):
    """What the report reads of Faust's consumer."""

    def assignment(self) -> Iterable[PartitionId]: ...
    def highwater(self, tp: PartitionId) -> int | None: ...
    async def position(self, tp: PartitionId) -> int | None: ...


class LagReport:
    """Sets and removes the lag series of the request topic's partitions."""

    def __init__(
        self,
        topic: str,
        pending_offset: Callable[[Hashable], int | None],
        metrics: WorkerMetrics,
    ) -> None:
        self._topic = topic
        self._pending_offset = pending_offset
        self._metrics = metrics
        #: Partitions with a lag series set since the last ``forget``.
        self._reported: set[int] = set()

    async def report(self, consumer: LagSource, *, paused: bool = False) -> None:
        """Set the lag of every assigned request partition.

        Nothing is read while ``paused`` (a rebalance or a release: the assignment is changing),
        and a partition revoked while it is read is skipped: aiokafka's ``highwater`` fails an
        assertion and its ``position`` raises ``IllegalStateError`` for a partition it no longer
        holds.
        """
        if paused:
            return
        for tp in consumer.assignment():
            if tp.topic != self._topic:
                continue
            try:
                highwater = consumer.highwater(tp)
                pending = self._pending_offset(tp)
                position = pending if pending is not None else await consumer.position(tp)
            except (AssertionError, IllegalStateError):
                continue
            if highwater is None or highwater < 0 or position is None:
                continue
            self._metrics.set_consumer_lag(tp.partition, highwater - position)
            self._reported.add(tp.partition)

    def forget(self, partitions: Iterable[int] = ()) -> None:
        """Remove the series of every partition reported (and of ``partitions``)."""
        gone = self._reported | set(partitions)
        self._metrics.forget_partitions(gone)
        self._reported.clear()
