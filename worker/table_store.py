"""Where the ``chat-state`` table lives in memory: Faust's memory store, holding only what it owns.

Faust's memory store is a dict. It records a key's partition only when recovery reads the key from
the changelog, so keys written while the worker ran (every value the worker writes) had none:
when their partition went to another worker they stayed in memory for good, and came back from
the dict, stale, if the partition ever returned. This store records the partition of every key,
drops a partition's keys as soon as it is revoked, and (as Faust's store does) drops at the end
of every recovery the keys of partitions that are not this worker's active ones.

It also knows, per partition it owns, the offset of the newest changelog record it holds (read
in a recovery or written and acknowledged since): Faust's recovery of a partition that stays
with this worker across a rebalance reads on from there. Faust's memory store said "nothing
held", so every rebalance read again everything the worker had written since it started.

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

    def __post_init__(self) -> None:
        super().__post_init__()
        #: Changelog partitions this worker owns, as of the last rebalance.
        self._owned: set[int] = set()
        #: Per owned partition, the offset of the newest changelog record held here.
        self._offsets: dict[int, int] = {}

    def persisted_offset(self, tp: TP) -> int | None:
        """The offset of the newest record of ``tp`` held here; None: none held."""
        return self._offsets.get(tp.partition)

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """Note an acknowledged write (Faust calls this); ignored for a partition not owned."""
        self._hold(tp.partition, offset)

    def _hold(self, partition: int, offset: int) -> None:
        if partition in self._owned and offset > self._offsets.get(partition, -1):
            self._offsets[partition] = offset

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
        for partition in gone:
            self._offsets.pop(partition, None)
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
            self._hold(message.partition, message.offset)
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
        self._owned = {tp.partition for tp in assigned if tp.topic == changelog}
        self.drop_partitions(tp.partition for tp in revoked if tp.topic == changelog)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        """Drop everything of partitions that are not this worker's active ones."""
        await super().on_recovery_completed(active_tps, standby_tps)
        active = {tp.partition for tp in active_tps}
        self.drop_partitions(set(self._offsets) - active)


def _record_ms(message: Any) -> int:
    """The changelog record's time in ms; now for a record without one."""
    timestamp = message.timestamp
    if isinstance(timestamp, int | float) and timestamp > 0:
        return round(timestamp * 1000)
    return round(time.time() * 1000)
