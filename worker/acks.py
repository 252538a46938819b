"""Broker acknowledgements of one attempt's deltas: their publish latency, and waiting for all.

Every delta send returns a future that the producer resolves when the broker acknowledged the
record. Two things need them: the ``chat_worker_delta_publish_seconds`` histogram (time from the
SSE event to its ack) and the final response, which may only be published once every delta of its
attempt is acknowledged.

Done-callbacks are the costly part: one per delta for the histogram and one more per delta for
an ``asyncio.gather`` over them would each be scheduled through the event loop, for every delta
(what that costs: ``bench/README.md``). The producer acknowledges a whole batch at once, and a
partition's batches in the order they were sent, so ``DeltaAcks`` watches only the oldest
unacknowledged delta: when it is acknowledged, every delta then acknowledged is observed in one
callback (at the same time the per-delta callbacks would have run), and the next unacknowledged
one is watched. One callback per batch, not per delta; every delta still observed once. Should
acks ever arrive out of order, a delta acknowledged early is observed when the ones before it
are: later, never twice, never lost.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["DeltaAcks"]


class DeltaAcks:
    """The acks of one attempt's deltas, in send order."""

    __slots__ = ("_clock", "_futures", "_observe", "_others", "_unobserved", "_watching")

    def __init__(self, observe: Callable[[float], None], clock: Callable[[], float]) -> None:
        self._observe = observe
        self._clock = clock
        #: Every future added, in send order.
        self._futures: list[asyncio.Future[object]] = []
        #: Awaitables that are not futures (test doubles): awaited, not observed.
        self._others: list[Awaitable[object]] = []
        #: (ack, when its event was received) of the deltas not yet observed, in send order.
        self._unobserved: deque[tuple[asyncio.Future[object], float]] = deque()
        self._watching = False

    def __len__(self) -> int:
        return len(self._futures) + len(self._others)

    def add(self, ack: Awaitable[object], received_at: float) -> None:
        """Track the ack of a delta whose SSE event arrived at ``received_at`` (``clock`` time)."""
        if not isinstance(ack, asyncio.Future):
            self._others.append(ack)
            return
        self._futures.append(ack)
        self._unobserved.append((ack, received_at))
        if not self._watching:
            self._watch()

    def _watch(self) -> None:
        self._watching = True
        self._unobserved[0][0].add_done_callback(self._on_ack)

    def _on_ack(self, _ack: asyncio.Future[object]) -> None:
        now = self._clock()
        unobserved = self._unobserved
        while unobserved and unobserved[0][0].done():
            self._observe(now - unobserved.popleft()[1])
        self._watching = False
        if unobserved:
            self._watch()

    async def wait(self) -> None:
        """Return once every delta is acknowledged; raise the first failed send's error.

        Every failure is retrieved (none is logged later as "never retrieved"); the first in send
        order is raised once all are done.
        """
        pending = [ack for ack in self._futures if not ack.done()]
        if pending:
            # The producer acknowledges a partition's batches in send order, so once the last
            # is done the rest usually are: one callback, not one per delta (``asyncio.wait``
            # adds and removes a callback on every future it is given).
            await asyncio.wait(pending[-1:])
            pending = [ack for ack in pending if not ack.done()]
            if pending:
                await asyncio.wait(pending)
        for other in self._others:
            await other
        error: BaseException | None = None
        for ack in self._futures:
            exc = ack.exception()
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise error
