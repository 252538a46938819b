"""Idle conversations expire: the rule (pure), and the sweep that applies it to the table.

A conversation whose last request finished ``WORKER_CONVERSATION_TTL_S`` ago or longer is deleted
from the ``chat-state`` table: locally, and with a tombstone on its own changelog partition, so
that compaction drops it from the changelog and no recovery reads it again. Its next turn starts
a fresh Vapi chat.

The race with a new turn: a conversation with a record taken and unfinished (running, or waiting
in the scheduler) is never deleted, and the check and the local delete happen with nothing in
between (no ``await``). A record taken after the delete reads no state, like any turn after
expiry, and its write reaches the changelog after the tombstone (``StateTable.delete_soon``).

The sweep runs on a timer, only over partitions this worker actively owns and only while no
rebalance is under way: it stops as soon as one starts. It walks the table in chunks, handing
the event loop back between them, so a table of a million conversations does not stall streams.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import structlog

from worker.kafka_adapters import StateTable
from worker.state import value_last_active_ms, with_last_active

log = structlog.get_logger(__name__)

#: Conversations looked at between two hand-backs of the event loop.
SWEEP_CHUNK = 1_000


def is_expired(last_active_ms: int | None, *, now_ms: int, ttl_ms: int, pending: bool) -> bool:
    """True when a conversation may be deleted now.

    ``pending`` says a record of it is taken and unfinished: such a conversation is in use,
    however long ago its last request finished. ``last_active_ms`` None means the value carries
    no state to keep (it is not a conversation's value): it may go. A time in the future (another
    worker's clock ahead of this one) keeps the conversation until that time plus the TTL.
    """
    if pending:
        return False
    if last_active_ms is None:
        return True
    return now_ms - last_active_ms >= ttl_ms


def sweep_interval_s(ttl_s: float) -> float:
    """How often the sweep runs: a tenth of the TTL, between 1 s and 10 minutes."""
    return min(max(ttl_s / 10, 1.0), 600.0)


class ConversationExpiry:
    """Deletes idle conversations from the table (see the module docstring).

    ``pending(partition, conversation_id)`` says whether a record of that conversation is taken
    and unfinished; ``clock`` is the wall clock in seconds.
    """

    def __init__(
        self,
        table: StateTable,
        *,
        ttl_s: float,
        pending: Callable[[int, str], bool],
        on_expired: Callable[[int], None] = lambda _count: None,
        clock: Callable[[], float] = time.time,
        chunk: int = SWEEP_CHUNK,
    ) -> None:
        self._table = table
        self._ttl_ms = round(ttl_s * 1000)
        self._pending = pending
        self._on_expired = on_expired
        self._clock = clock
        self._chunk = chunk

    async def sweep(self, partitions: Collection[int], still_owned: Callable[[], bool]) -> int:
        """Delete the idle conversations of ``partitions``; returns how many tombstones landed.

        ``still_owned()`` turns false when a rebalance starts: the sweep stops there.
        """
        now_ms = round(self._clock() * 1000)
        keys = list(self._table.store.data)
        tally = _Tally()
        for start in range(0, len(keys), self._chunk):
            if not still_owned():
                break
            chunk = keys[start : start + self._chunk]
            await self._sweep_chunk(chunk, partitions, now_ms, still_owned, tally)
            await asyncio.sleep(0)
        if tally.failed:
            # Gone from memory, still on the changelog: the next recovery reads them back and a
            # later sweep expires them again.
            log.warning(
                "tombstones of expired conversations not written",
                conversations=tally.failed,
                error=repr(tally.error),
            )
        if tally.expired:
            self._on_expired(tally.expired)
            log.info("idle conversations expired", conversations=tally.expired)
        return tally.expired

    async def _sweep_chunk(
        self,
        keys: list[str],
        partitions: Collection[int],
        now_ms: int,
        still_owned: Callable[[], bool],
        tally: _Tally,
    ) -> None:
        """Delete the expired conversations among ``keys``, and wait for their tombstones."""
        acks: list[asyncio.Future[object]] = []
        for key in keys:
            if not still_owned():
                break
            partition = self._expired_partition(key, partitions, now_ms)
            if partition is None:
                continue
            try:
                acks.append(asyncio.ensure_future(await self._table.delete_soon(key, partition)))
            except Exception as exc:
                tally.fail(exc)
        for outcome in await asyncio.gather(*acks, return_exceptions=True):
            if isinstance(outcome, BaseException):
                tally.fail(outcome)
            else:
                tally.expired += 1

    def _expired_partition(self, key: str, partitions: Collection[int], now_ms: int) -> int | None:
        """The changelog partition of ``key`` if it is to be deleted now, else None."""
        store = self._table.store
        partition = store.partition_of(key)
        if partition is None or partition not in partitions:
            return None
        value = store.data.get(key)
        last_active_ms = value_last_active_ms(value)
        if last_active_ms is None and isinstance(value, dict):
            # Not known when it was last active: as of now.
            store.put(key, with_last_active(value, now_ms), partition)
            return None
        pending = self._pending(partition, key)
        return (
            partition
            if is_expired(last_active_ms, now_ms=now_ms, ttl_ms=self._ttl_ms, pending=pending)
            else None
        )


@dataclass
class _Tally:
    """What one sweep did."""

    expired: int = 0
    failed: int = 0
    error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        self.failed += 1
        self.error = self.error or error
