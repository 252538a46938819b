"""The dispatcher: takes records from the one agent, schedules them, acks them, lets go of them.

Why one dispatcher agent with manual acks and not ``@app.agent(concurrency=N)``: Faust's actors
share one queue, so neither per-conversation order nor "never commit past an unfinished request"
holds (docs/design.md §10.1). Here the agent only takes records; ``KeyOrderedScheduler`` decides
which may run, and acks go back to Faust strictly in offset order per partition, only for the
leading run of finished records, so Faust's commit can never pass a request still in flight.

What running a record means is ``worker.lifecycle``'s: the dispatcher creates a record's task
when the scheduler starts it, awaits ``RequestLifecycle.run`` there, and acks what it finished.
On a release (shutdown, every revocation: §9) it lets go of every record it took, within a bound.

A cancel (``chat.cancel.v1``, or a request with ``supersede``) must not wait behind the requests
it cancels: it is applied when it is taken (``RequestLifecycle.cancel``), to the records of its
partition taken before it, whatever the scheduler's queues (docs/design.md §5.8). The look-ahead
is the buffer: a cancel that finds it full waits for room like any record. The cancel record
itself is then scheduled without an ordering key and acked in offset order like any other.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Hashable, Iterable, MutableSet
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from faust.types import TP

from worker.config import Settings
from worker.lag import LagReport
from worker.lifecycle import Event, Message, PartitionId, Record, RequestLifecycle
from worker.metrics import WorkerMetrics
from worker.scheduler import KeyOrderedScheduler, Ticket

log = structlog.get_logger(__name__)

#: The log line of a release that cut final steps off or dropped the producer's records.
FINAL_STEPS_CUT_OFF = "final steps cut off at the finish timeout, their records left for redelivery"
#: The error of sends on the producer after its records were dropped, and of the crash it causes.
PRODUCER_CLOSED = (
    "Kafka did not take the worker's outputs within WORKER_FINISH_TIMEOUT_S after the grace "
    "period; the producer dropped them and is closed, the worker stops"
)


class Stream(Protocol):
    """The agent's stream as the dispatcher uses it: ``stream.noack()`` of Faust (§10.1)."""

    async def ack(self, event: Event) -> bool: ...


class Consumer(Protocol):
    """Faust's consumer as the dispatcher uses it."""

    @property
    def unacked(self) -> MutableSet[Any]:
        """The messages taken and not acked: Faust's own set, which its drain waits to empty
        (docs/design.md §10.2), not a copy."""
        ...


class HeldRecords(Protocol):
    """What the producer still holds (``worker.kafka_adapters.KafkaPublisher``)."""

    async def flush_within(self, timeout_s: float) -> bool: ...
    async def drop_held_records(self, reason: str) -> dict[str, int]: ...


@dataclass(eq=False, slots=True)
class Job:
    """One taken record on its way through the scheduler."""

    record: Record
    ticket: Ticket[Job] | None = None
    #: Created when the scheduler starts the record.
    task: asyncio.Task[None] | None = None


class Dispatcher:
    """Takes records, schedules them, acks them in order, releases them (see module docstring)."""

    def __init__(
        self,
        settings: Settings,
        lifecycle: RequestLifecycle,
        producer: HeldRecords,
        metrics: WorkerMetrics,
        consumer: Callable[[], Consumer | None],
    ) -> None:
        self._settings = settings
        self._lifecycle = lifecycle
        self._producer = producer
        self._metrics = metrics
        self._consumer = consumer
        self.scheduler: KeyOrderedScheduler[Job] = KeyOrderedScheduler(
            settings.worker_max_in_flight, settings.worker_max_buffered
        )
        self.lag = LagReport(settings.topic_requests, self.scheduler.pending_offsets, metrics)
        self._jobs: dict[tuple[Hashable, int], Job] = {}
        #: Per partition, the highest offset taken since the last release.
        self._last_taken: dict[PartitionId, int] = {}
        self._capacity = asyncio.Event()
        self._stream: Stream | None = None
        #: True while the dispatcher lets go of its records.
        self.releasing = False
        #: True from the end of a release until Faust assigns partitions again.
        self._between_assignments = False

    async def take(self, stream: Stream, event: Event) -> None:
        """Accept one record from the agent loop; waits while the buffer is full (backpressure)."""
        self._stream = stream
        while not self.scheduler.has_capacity and not self.releasing:
            self._capacity.clear()
            await self._capacity.wait()
        message = event.message
        if self.releasing or self._between_assignments:
            # Redelivered to whoever owns the partition next. Between a release and the next
            # assignment no record belongs to this worker: Faust can still hand some over (a
            # recovery of the revoked assignment ending after the revocation resumes the flow),
            # and taking them would run them outside any assignment and skip their redelivery.
            self._forget(message)
            return
        if self._taken_before(message):
            return
        record = self._lifecycle.read(event)
        if record.cancels_others:
            tp = message.tp
            self._lifecycle.cancel(
                record, (job.record for (taken, _), job in self._jobs.items() if taken == tp)
            )
        job = Job(record)
        self._jobs[(message.tp, message.offset)] = job
        self._start(self.scheduler.submit(message.tp, message.offset, record.conversation_id, job))
        self._metrics.buffered.set(self.scheduler.buffered)

    def set_max_in_flight(self, limit: int) -> None:
        """Run at most ``limit`` requests at once from now on (``worker.fleet_limits``)."""
        self._start(self.scheduler.set_max_in_flight(limit))

    def has_pending(self, partition: int, conversation_id: str) -> bool:
        """True while a record of the conversation, taken from ``partition``, is unfinished."""
        return self.scheduler.has_pending(
            TP(self._settings.topic_requests, partition), conversation_id
        )

    def _taken_before(self, message: Message) -> bool:
        """True for a record Faust hands over twice: the copy is dropped, the original runs on.

        Faust seeks partitions back to their committed offset while its fetcher runs, so records
        handed over before a seek can come again. Acking the copy could commit past the
        still-running original, so it is only dropped from Faust's unacked set. This holds
        because what was taken before came in order from the committed offset:
        ``worker.kafka_adapters.RewindingConsumer`` reads a partition only once it is sought.
        """
        last = self._last_taken.get(message.tp)
        if last is None or message.offset > last:
            self._last_taken[message.tp] = message.offset
            return False
        self._forget(message)
        log.warning(
            "record delivered twice, copy skipped",
            partition=message.partition,
            offset=message.offset,
            last_taken=last,
        )
        return True

    def _start(self, tickets: Iterable[Ticket[Job]]) -> None:
        """Create the task of each record the scheduler started, unless the dispatcher releases.

        Each task starts in an empty context: nothing of the code that started it (another
        request's log context) carries over.
        """
        for ticket in tickets:
            job = ticket.item
            job.ticket = ticket
            if self.releasing:
                continue  # left unfinished for the partition's next owner
            job.task = asyncio.create_task(self._run(job), context=contextvars.Context())

    async def _run(self, job: Job) -> None:
        if await self._lifecycle.run(job.record):
            await self._complete(job)

    async def _complete(self, job: Job) -> None:
        """The record is finished: start what may start now, ack what may be acked, in order."""
        assert job.ticket is not None
        assert self._stream is not None
        completion = self.scheduler.complete(job.ticket)
        self._start(completion.start)
        for tp, offset in completion.ack:
            done = self._jobs.pop((tp, offset))
            await self._stream.ack(done.record.event)
        self._metrics.buffered.set(self.scheduler.buffered)
        self._capacity.set()

    async def release(self, grace_s: float) -> bool:
        """Let go of every taken record before Faust's drain: on shutdown and on rebalance.

        Records that have not started are dropped at once; running ones get ``grace_s`` to
        finish (and are acked as usual), then are cancelled, which closes their HTTP streams.
        Those already in their final step (response, then table write) go on, shielded, for up
        to ``WORKER_FINISH_TIMEOUT_S`` more, then are cut off. The producer then gets the rest of
        that time to deliver what it holds; what it still holds is dropped
        (``worker.kafka_adapters.drop_held_records``), so nothing of a released request can land
        once its partition has moved on. The release so ends within ``grace_s`` +
        ``WORKER_FINISH_TIMEOUT_S`` (and ``SENDER_STOP_S``).

        Nothing unfinished is acked, so nothing unfinished is committed: the partition's next
        owner (this worker again, after a rebalance) gets those records from the committed
        offset. Faust's drain waits for every taken, unacked record (``stream_wait_empty``);
        dropping our hold on them is what lets it end within the grace period.

        Returns False when the producer's records were dropped: it can send nothing more, so
        the worker has to stop.
        """
        self.releasing = True
        self._capacity.set()
        try:
            grace_end = time.monotonic() + grace_s
            finish_end = grace_end + self._settings.worker_finish_timeout_s
            # No task starts while releasing: the running ones are all there will be.
            running = [job.task for job in self._jobs.values() if job.task is not None]
            running = [task for task in running if not task.done()]
            if running and grace_end > time.monotonic():
                await asyncio.wait(running, timeout=grace_end - time.monotonic())
            for task in running:
                task.cancel()  # a final step under way goes on: the lifecycle shields it
            await asyncio.gather(*running, return_exceptions=True)
            finished, cut = await self._lifecycle.settle(finish_end)
            for record in finished:
                await self._complete(self._jobs[(record.message.tp, record.message.offset)])
            delivered = await self._producer.flush_within(finish_end - time.monotonic())
            dropped = {} if delivered else await self._producer.drop_held_records(PRODUCER_CLOSED)
            if cut or not delivered:
                cut_ids = [record.request.request_id for record in cut if record.request]
                log.error(
                    FINAL_STEPS_CUT_OFF,
                    final_steps=len(cut_ids),
                    request_ids=cut_ids[:20],
                    records_dropped=sum(dropped.values()),
                    dropped_by_topic=dropped,
                    producer_closed=not delivered,
                    finish_timeout_s=self._settings.worker_finish_timeout_s,
                )
            # Every partition taken from since the last release, also those with nothing pending:
            # their next records may start below the last offset seen (after a failed commit).
            partitions = {job.record.message.tp for job in self._jobs.values()} | set(
                self._last_taken
            )
            self.scheduler.revoke(partitions)
            # Their lag is the next owner's to report.
            self.lag.forget(tp.partition for tp in partitions)
            for job in self._jobs.values():
                self._forget(job.record.message)
            if self._jobs:
                log.info("released unfinished records for redelivery", records=len(self._jobs))
            self._jobs.clear()
            self._last_taken.clear()
            self._metrics.buffered.set(self.scheduler.buffered)
        finally:
            self.releasing = False
            self._between_assignments = True
        return delivered

    def on_assigned(self) -> None:
        """Faust assigned partitions: records handed over from now on are taken again."""
        self._between_assignments = False

    def _forget(self, message: Message) -> None:
        # Faust's drain loops while a taken message is unacked and still referenced. Removing it
        # from that set (without acking) ends the wait and leaves its offset uncommitted.
        consumer = self._consumer()
        if consumer is not None:
            consumer.unacked.discard(message)
