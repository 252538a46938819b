"""What the producer still holds when the worker lets go of its partitions: wait, bounded, or drop.

An idempotent aiokafka producer never expires a batch: it retries a retriable error (a deleted or
leaderless partition, too few in-sync replicas, a broker that does not answer) until the broker
takes the record. Faust flushes the producer after a release and before every commit, so one such
record would hold a shutdown or a rebalance forever, and once the partition had moved on, the
record could still land: a final response from a worker that no longer owns the request, or a
``chat-state`` write restored over the next owner's newer one.

So the worker waits for its producer for a bounded time (:func:`flush_within`) and, past that,
drops what it holds (:func:`drop_held_records`): its sender stops, its connections close and every
held record fails, so none of them can be sent any more. The producer is of no further use; the
process stops and restarts with a new one. A produce request already on the wire when the sender
stops cannot be recalled: the broker appends it or not when it reads it, in practice at once.

Only aiokafka's private parts can do this (its accumulator, sender and connections): aiokafka is
pinned below 0.15, and ``tests/e2e/test_held_records.py`` and the "outputs Kafka will not take"
tests in ``tests/e2e/test_worker_faults.py`` cover it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.conn import CloseReason
from aiokafka.errors import KafkaError

__all__ = ["drop_held_records", "flush_within"]

#: How long a stopped sender gets to wind down its requests in flight (they fail at once: their
#: connections are closed first).
SENDER_STOP_S = 1.0


async def flush_within(producer: Any, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` until the broker acked (or refused) every record ``producer`` holds.

    Returns False when records were still held at the deadline.
    """
    flush = asyncio.ensure_future(producer.flush())
    done, _ = await asyncio.wait([flush], timeout=max(timeout_s, 0.0))
    if not done:
        flush.cancel()  # only a wait on the batches: cancelling it leaves them as they are
        return False
    return True


async def drop_held_records(producer: Any, reason: str) -> dict[str, int]:
    """Stop ``producer`` sending and fail every record it holds; returns their count per topic.

    Afterwards nothing of what it held can reach the broker. A later send on it fails with a
    ``KafkaError`` carrying ``reason`` (after waiting, up to the request timeout, for its topic's
    metadata if the producer has none): the producer is of no further use.
    """
    accumulator = producer._message_accumulator  # noqa: SLF001  the held batches
    sender_task = producer._sender.sender_task  # noqa: SLF001  the task that sends them
    if sender_task is not None:
        sender_task.cancel()  # no more batches drained, no more retries
    for conn in list(producer.client._conns.values()):  # noqa: SLF001  its connections
        conn.close(reason=CloseReason.SHUTDOWN)  # requests in flight fail now, not at their timeout
    if sender_task is not None:
        # Its requests in flight end first (each puts its batch back for a retry that never comes).
        await asyncio.wait([sender_task], timeout=SENDER_STOP_S)
    batches = accumulator._batches.values()  # noqa: SLF001  batches not sent yet
    queued = [batch for per_partition in batches for batch in per_partition]
    held = queued + list(accumulator._pending_batches)  # noqa: SLF001  batches in flight
    # A batch that went out and came back for a retry has a callback that takes it out of the
    # in-flight set once it is done: it must be in that set when it fails.
    retried = (batch for batch in queued if batch.retry_count > 0)
    accumulator._pending_batches.update(retried)  # noqa: SLF001  as a sent batch is
    for batch in held:
        for future, _ in batch._msg_futures:  # noqa: SLF001  each record's future
            future.add_done_callback(_retrieve)  # nobody may be left to await it
    accumulator.fail_all(KafkaError(reason))
    dropped: dict[str, int] = {}
    for batch in held:
        dropped[batch.tp.topic] = dropped.get(batch.tp.topic, 0) + batch.record_count
    return dropped


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
