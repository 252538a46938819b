"""Where the ``chat-state`` table lives in memory: Faust's memory store, holding only what it owns.

Faust's memory store is a dict. It records a key's partition only when recovery reads the key from
the changelog, so keys written while the worker ran (every value the worker writes) had none:
when their partition went to another worker they stayed in memory for good, and came back from
the dict, stale, if the partition ever returned. This store records the partition of every key,
drops a partition's keys as soon as it is revoked, and (as Faust's store does) drops at the end
of every recovery the keys of partitions that are not this worker's active ones.

Recovery applies changelog records in offset order: a value replaces the key's, a tombstone
(value None) deletes it. A value written before conversations had a ``last_active_ms`` gets the
time of its changelog record (``worker.state.with_last_active``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from faust.stores.memory import Store
from faust.types import TP, EventT

from worker.state import with_last_active


class TableStore(Store[Any, Any]):
    """Faust's in-memory store with every key's partition known (see the module docstring)."""

    def put(self, key: Any, value: Any, partition: int) -> None:
        """Set ``key`` to ``value``, a key of changelog ``partition``."""
        self.data[key] = value
        self._key_partition[key] = partition

    def remove(self, key: Any) -> None:
        """Forget ``key`` (nothing happens when it is not here)."""
        self.data.pop(key, None)
        self._key_partition.pop(key, None)

    def partition_of(self, key: Any) -> int | None:
        """The changelog partition of ``key``; None for a key this store does not hold."""
        return self._key_partition.get(key)

    def drop_partitions(self, partitions: Iterable[int]) -> int:
        """Forget every key of ``partitions``; returns how many went."""
        gone = set(partitions)
        if not gone:
            return 0
        keys = [key for key, partition in self._key_partition.items() if partition in gone]
        for key in keys:
            self.remove(key)
        return len(keys)

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT[Any]],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        """Apply changelog records in order: a value sets its key, a tombstone deletes it."""
        for event in batch:
            key = to_key(event.key)
            message = event.message
            if message.value is None:
                self.remove(key)
                continue
            value = with_last_active(to_value(event.value), _record_ms(message))
            self.put(key, value, message.partition)

    async def on_rebalance(
        self,
        assigned: set[TP],
        revoked: set[TP],
        newly_assigned: set[TP],
        generation_id: int = 0,
    ) -> None:
        """Drop the keys of changelog partitions this worker lost."""
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        changelog = self.table.changelog_topic.get_topic_name()
        self.drop_partitions(tp.partition for tp in revoked if tp.topic == changelog)


def _record_ms(message: Any) -> int:
    """The changelog record's time in ms; now for a record without one."""
    timestamp = message.timestamp
    if isinstance(timestamp, int | float) and timestamp > 0:
        return round(timestamp * 1000)
    return round(time.time() * 1000)
