"""Key-ordered concurrency with safe commit tracking: pure bookkeeping, no I/O, no clocks.

Why not Faust's own concurrency
-------------------------------
``@app.agent(..., concurrency=N)`` starts N actors that share one queue. Records go to whichever
actor is free, so two turns of one conversation can run at once or overtake each other
(robinhood/faust#422), and an actor that acks a fast record lets the consumer commit past a slow
one still running in another actor (robinhood/faust#682, #355; faust-streaming#606): a crash then
loses the slow record. So the worker runs one dispatcher that takes records in offset order and
asks this scheduler what may start and what may be acked: the model of Confluent's Parallel
Consumer in KEY ordering mode.

The model
---------
* Every record taken from a partition is ``submit``-ted, in offset order, and becomes a
  :class:`Ticket`. Its ordering key is ``(partition, key)``; ``key=None`` means "no ordering
  constraint" (e.g. an invalid record that only needs a DLQ write).
* Per ordering key, records run strictly one at a time, in offset order: the key's first pending
  record is its *head*; the others wait behind it (*blocked*).
* Across keys, at most ``max_in_flight`` records run at once (``key=None`` records included). A head
  that finds no free slot waits in the *ready* queue. The bound may change while records run
  (``set_max_in_flight``: the fleet share after a rebalance, the limit after a 429): lowered, the
  running ones finish and nothing starts until fewer than the new bound run. Slots are handed out
  oldest submission first, so the ready queue is FIFO and a key's next record, once its
  predecessor finishes, does not queue behind records that were taken after it.
* ``buffered`` counts records taken and not finished (running, ready or blocked); the caller stops
  taking records while ``has_capacity`` is false (backpressure). Finished records held back by an
  unfinished one are not counted there; ``unacked`` counts them too.
* Commits: per partition, ``complete`` returns only the leading run of finished offsets, in order,
  never one past an unfinished record. The caller acks exactly those (``await stream.ack(event)``),
  in that order, so Faust's consumer never sees a gap it could commit across.
* ``revoke`` forgets partitions: their running tickets are returned for the caller to cancel,
  the others are dropped. A later ``complete`` of a revoked ticket is ignored. The slots a revoke
  frees go to other partitions' waiting records at the next ``submit`` or ``complete`` (the
  dispatcher revokes every partition it holds at once, so none are left waiting).

Tickets are matched by identity: ``complete`` takes the very object ``submit``/``complete``
returned. Each ticket also carries the *epoch* of its partition's assignment, so a
ticket from before a revoke never completes the record with the same offset taken after the
partition came back.

Costs: ``submit`` and ``complete`` are O(log n) in the number of ready records
(a heap ordered by submission), everything else O(1) amortized; ``revoke`` is O(n).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Completion", "KeyOrderedScheduler", "Ticket"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ticket(Generic[T]):
    """One taken record; ``item`` is the caller's payload (e.g. the Faust event)."""

    partition: Hashable
    offset: int
    key: str | None
    item: T
    #: The partition assignment the ticket belongs to; set by the scheduler, 0 = never issued.
    epoch: int = field(default=0, repr=False)


@dataclass(frozen=True, slots=True)
class Completion(Generic[T]):
    """What a finished ticket unlocks: tickets to start now, and offsets to ack now, in order."""

    start: list[Ticket[T]]
    ack: list[tuple[Hashable, int]]


# A ticket with its global submission number: the ready heap's order; unique, so tickets never
# get compared.
_Entry = tuple[int, Ticket[T]]


@dataclass(slots=True)
class _Partition(Generic[T]):
    """The scheduler's view of one assigned partition."""

    epoch: int
    last_offset: int | None = None
    #: Offsets taken and not yet acked, in offset order; the first one is always unfinished.
    taken: deque[int] = field(default_factory=deque)
    #: Offsets in ``taken`` that are finished (held back behind an unfinished one).
    finished: set[int] = field(default_factory=set)
    #: Running tickets by offset.
    running: dict[int, Ticket[T]] = field(default_factory=dict)
    #: Per key, its pending tickets in offset order: the head is running or ready, the rest blocked.
    queues: dict[str, deque[_Entry[T]]] = field(default_factory=dict)


class KeyOrderedScheduler(Generic[T]):
    """Decides which taken records may run and which offsets may be acked (see module docstring)."""

    def __init__(self, max_in_flight: int, max_buffered: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self._max_in_flight = max_in_flight
        self._max_buffered = max_buffered
        self._partitions: dict[Hashable, _Partition[T]] = {}
        self._ready: list[_Entry[T]] = []  # heap by submission number
        self._submitted = 0
        self._epochs = 0
        self._running = 0
        self._buffered = 0
        self._unacked = 0

    @property
    def max_in_flight(self) -> int:
        """The bound on running tickets."""
        return self._max_in_flight

    @property
    def max_buffered(self) -> int:
        """The bound on taken and unfinished records the caller keeps to."""
        return self._max_buffered

    @property
    def has_capacity(self) -> bool:
        """Whether the caller may take another record (``buffered < max_buffered``)."""
        return self._buffered < self._max_buffered

    @property
    def running(self) -> int:
        """Tickets started and not completed."""
        return self._running

    @property
    def buffered(self) -> int:
        """Records taken and not finished: running plus waiting."""
        return self._buffered

    @property
    def waiting(self) -> int:
        """Records taken and not started: waiting for a slot or behind their key."""
        return self._buffered - self._running

    @property
    def unacked(self) -> int:
        """Records taken and not yet returned for acking (finished ones held back included)."""
        return self._unacked

    def set_max_in_flight(self, max_in_flight: int) -> list[Ticket[T]]:
        """Change the bound on running tickets; returns the tickets to start now.

        Raised: waiting heads start, oldest submission first. Lowered: running tickets go on, and
        none starts until fewer than the new bound run. 0 starts nothing.
        """
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0, got {max_in_flight}")
        self._max_in_flight = max_in_flight
        return self._fill()

    def pending_offsets(self, partition: Hashable) -> int | None:
        """The lowest unfinished offset of ``partition``, or None when nothing of it is pending."""
        state = self._partitions.get(partition)
        if state is None or not state.taken:
            return None
        return state.taken[0]

    def has_pending(self, partition: Hashable, key: str) -> bool:
        """True while a record of ``key`` from ``partition`` is taken and unfinished."""
        state = self._partitions.get(partition)
        return state is not None and key in state.queues

    def submit(self, partition: Hashable, offset: int, key: str | None, item: T) -> list[Ticket[T]]:
        """Take a record; returns the tickets to start now: this one if its key and a slot are free.

        Offsets of one partition must increase. The record is taken even when ``has_capacity`` is
        false: backpressure is the caller's to apply before taking.
        """
        state = self._partitions.get(partition)
        if state is None:
            self._epochs += 1
            state = self._partitions[partition] = _Partition(epoch=self._epochs)
        elif state.last_offset is not None and offset <= state.last_offset:
            raise ValueError(
                f"offset {offset} of partition {partition!r} submitted after {state.last_offset}"
            )
        ticket = Ticket(partition, offset, key, item, state.epoch)
        entry: _Entry[T] = (self._submitted, ticket)
        self._submitted += 1
        state.last_offset = offset
        state.taken.append(offset)
        self._buffered += 1
        self._unacked += 1
        if key is not None:
            queue = state.queues.get(key)
            if queue is not None:
                queue.append(entry)  # blocked behind the key's head
                return self._fill()
            state.queues[key] = deque([entry])
        heapq.heappush(self._ready, entry)
        return self._fill()

    def complete(self, ticket: Ticket[T]) -> Completion[T]:
        """Mark a running ticket finished; returns what may start and what may be acked now.

        Raises ValueError for a ticket that is not running (completed twice, or never started),
        except for a ticket of a revoked partition, which is ignored (empty completion).
        """
        state = self._live_state(ticket)
        if state is None:
            return Completion(start=[], ack=[])
        if state.running.get(ticket.offset) is not ticket:
            raise ValueError(f"ticket {ticket!r} is not running")
        del state.running[ticket.offset]
        self._running -= 1
        self._buffered -= 1
        ack = self._finish(state, ticket)
        self._release_key(state, ticket)
        return Completion(start=self._fill(), ack=ack)

    def revoke(self, partitions: Iterable[Hashable]) -> list[Ticket[T]]:
        """Forget ``partitions``; returns their running tickets, for the caller to cancel.

        Their waiting records are dropped. Slots freed here go to other partitions' waiting records
        at the next ``submit`` or ``complete``.
        """
        cancelled: list[Ticket[T]] = []
        gone: set[Hashable] = set()
        for partition in partitions:
            state = self._partitions.pop(partition, None)
            if state is None:
                continue
            gone.add(partition)
            cancelled.extend(state.running.values())
            self._running -= len(state.running)
            self._buffered -= len(state.taken) - len(state.finished)
            self._unacked -= len(state.taken)
        if gone:
            self._ready = [entry for entry in self._ready if entry[1].partition not in gone]
            heapq.heapify(self._ready)
        return cancelled

    def _live_state(self, ticket: Ticket[T]) -> _Partition[T] | None:
        """The partition state ``ticket`` belongs to; None if that assignment was revoked."""
        state = self._partitions.get(ticket.partition)
        if state is not None and state.epoch == ticket.epoch:
            return state
        if 0 < ticket.epoch <= self._epochs:
            return None
        raise ValueError(f"ticket {ticket!r} was not issued by this scheduler")

    def _finish(self, state: _Partition[T], ticket: Ticket[T]) -> list[tuple[Hashable, int]]:
        """Mark ``ticket`` finished; pop and return its partition's leading finished offsets."""
        state.finished.add(ticket.offset)
        ack: list[tuple[Hashable, int]] = []
        taken, finished = state.taken, state.finished
        while taken and taken[0] in finished:
            offset = taken.popleft()
            finished.remove(offset)
            ack.append((ticket.partition, offset))
        self._unacked -= len(ack)
        return ack

    def _release_key(self, state: _Partition[T], ticket: Ticket[T]) -> None:
        """Drop ``ticket`` from the head of its key; the key's next record becomes ready."""
        if ticket.key is None:
            return
        queue = state.queues[ticket.key]
        queue.popleft()
        if queue:
            heapq.heappush(self._ready, queue[0])
        else:
            del state.queues[ticket.key]

    def _fill(self) -> list[Ticket[T]]:
        """Start ready tickets, oldest submission first, while slots are free."""
        started: list[Ticket[T]] = []
        while self._running < self._max_in_flight and self._ready:
            _, ticket = heapq.heappop(self._ready)
            self._partitions[ticket.partition].running[ticket.offset] = ticket
            self._running += 1
            started.append(ticket)
        return started
