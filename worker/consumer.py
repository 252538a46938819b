"""The rewinding seek: a seek that never leaves a partition past records not taken.

Faust drops fetched records it cannot hand over yet (flow stopped during a rebalance, partition
not active, generation changed) and relies on ``perform_seek``, a seek of every assigned
partition to its committed offset, to read them again. aiokafka's ``seek_to_committed`` only
seeks a partition whose committed offset is above 0: a partition nobody ever committed stays
where the dropped fetch left it, past records no stream has seen, and the next record processed
there is committed past them. Those requests would be lost for good.

Here (and in ``worker.kafka_adapters.RewindingConsumer``, the consumer Faust runs) such a
partition is sought to its beginning instead, which is where a group without a
commit starts reading (``consumer_auto_offset_reset="earliest"``). Records read again are
recognised by the dispatcher (taken twice, or already finished in the table).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping

import aiokafka
import structlog
from faust.types import TP

log = structlog.get_logger(__name__)

#: How long the position lookups for the rewind's log line may take, together.
POSITION_LOOKUP_TIMEOUT_S = 0.5


def uncommitted(committed: Mapping[TP, int | None], skip_topics: Collection[str]) -> list[TP]:
    """Partitions of ``committed`` with no offset committed yet (None, -1 or 0)."""
    return [
        tp
        for tp, offset in committed.items()
        if (offset is None or offset <= 0) and tp.topic not in skip_topics
    ]


async def seek_to_committed_or_beginning(
    consumer: aiokafka.AIOKafkaConsumer, skip_topics: Collection[str] = ()
) -> Mapping[TP, int | None]:
    """Seek every assigned partition to its committed offset, or to its beginning without one.

    Partitions of ``skip_topics`` (the table changelogs, whose positions recovery manages) keep
    aiokafka's behaviour. Returns the committed offsets, as ``seek_to_committed`` does.
    """
    committed: Mapping[TP, int | None] = await consumer.seek_to_committed()
    rewind = uncommitted(committed, skip_topics)
    if not rewind:
        return committed
    found = await asyncio.gather(
        *(asyncio.wait_for(consumer.position(tp), POSITION_LOOKUP_TIMEOUT_S) for tp in rewind),
        return_exceptions=True,
    )
    await consumer.seek_to_beginning(*rewind)
    positions = {
        f"{tp.topic}[{tp.partition}]": at
        for tp, at in zip(rewind, found, strict=True)
        if isinstance(at, int) and at > 0
    }
    if positions:
        # A fetch had moved these past records no stream took: the loss this seek prevents.
        log.warning("uncommitted partitions rewound to their beginning", positions=positions)
    return committed
