"""The rewinding consumer: which partitions it rewinds, and the Faust internals it relies on."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Iterator, Set
from dataclasses import dataclass
from typing import Any

import faust
import pytest
from aiokafka import TopicPartition
from faust.tables.recovery import Recovery
from faust.transport.consumer import ThreadDelegateConsumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP

from worker.consumer import uncommitted
from worker.kafka_adapters import RewindingConsumer, RewindingConsumerThread

pytestmark = pytest.mark.unit


def test_partitions_without_a_commit_are_rewound_and_changelogs_are_not() -> None:
    committed = {
        TopicPartition("req", 0): None,
        TopicPartition("req", 1): -1,
        TopicPartition("req", 2): 0,
        TopicPartition("req", 3): 7,
        TopicPartition("app-chat-state-changelog", 0): None,
    }
    assert uncommitted(committed, {"app-chat-state-changelog"}) == [
        TopicPartition("req", 0),
        TopicPartition("req", 1),
        TopicPartition("req", 2),
    ]


def test_faust_still_builds_its_consumer_thread_where_the_worker_replaces_it() -> None:
    """Private Faust API (faust-streaming is pinned): fails loudly when an upgrade moves it."""
    assert issubclass(RewindingConsumer, AIOKafkaConsumer)
    assert issubclass(RewindingConsumerThread, AIOKafkaConsumerThread)
    assert "_new_consumer_thread" in vars(AIOKafkaConsumer)
    # perform_seek -> ThreadDelegateConsumer.seek_to_committed -> the thread's seek_to_committed
    delegate = inspect.getsource(ThreadDelegateConsumer.seek_to_committed)
    assert "self._thread.seek_to_committed()" in delegate
    for name in ("call_thread", "_ensure_consumer", "seek_to_committed"):
        assert callable(getattr(AIOKafkaConsumerThread, name))


# --- a stream partition is read only once it has been sought -----------------------------------

REQUESTS = TP("req", 0)
CHANGELOG = TP("app-chat-state-changelog", 0)


async def _noop(*_args: object, **_kwargs: object) -> None:
    return None


def consumer_of_an_app() -> RewindingConsumer:
    """The worker's consumer of an app with the ``chat-state`` table, never connected."""
    app = faust.App("app", broker="kafka://127.0.0.1:1", store="memory://")
    app.Table("chat-state")
    consumer = RewindingConsumer(
        app.transport,
        callback=_noop,
        on_partitions_revoked=_noop,
        on_partitions_assigned=_noop,
    )
    assignment = {REQUESTS, CHANGELOG}
    consumer.assignment = lambda: set(assignment)  # type: ignore[method-assign]
    consumer.pause_partitions(assignment)
    return consumer


async def test_a_stream_partition_faust_resumes_is_read_only_after_the_seek_that_follows() -> None:
    """Faust resumes the stream partitions at the end of a recovery, then seeks them: records
    fetched in between came from wherever the fetch position was, some of them dropped on the
    way, and ran ahead of the ones that came again after the seek."""
    consumer = consumer_of_an_app()
    read_during_the_seek: list[set[TP]] = []

    async def seek_to_committed() -> dict[TP, int]:
        read_during_the_seek.append(set(consumer._get_active_partitions()))
        return {REQUESTS: 7}

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
    consumer.resume_partitions({REQUESTS, CHANGELOG})
    assert consumer._get_active_partitions() == {CHANGELOG}, "a changelog resumes at once"
    await consumer.perform_seek()
    assert read_during_the_seek == [{CHANGELOG}]
    assert consumer._get_active_partitions() == {REQUESTS, CHANGELOG}


async def test_a_failed_seek_still_resumes_the_partitions_it_held() -> None:
    consumer = consumer_of_an_app()

    async def seek_to_committed() -> dict[TP, int]:
        raise RuntimeError("broker gone")

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
    consumer.resume_partitions({REQUESTS})
    with pytest.raises(RuntimeError):
        await consumer.perform_seek()
    assert REQUESTS in consumer._get_active_partitions()


async def test_a_partition_revoked_while_held_is_not_resumed_by_a_later_seek() -> None:
    consumer = consumer_of_an_app()

    async def seek_to_committed() -> dict[TP, int]:
        return {}

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
    consumer.resume_partitions({REQUESTS})
    await consumer.on_partitions_revoked({REQUESTS})
    await consumer.perform_seek()
    assert REQUESTS not in consumer._get_active_partitions()


def test_faust_still_resumes_the_stream_partitions_before_it_seeks_them() -> None:
    """The order the hold above answers (faust-streaming is pinned): fails when it changes."""
    source = inspect.getsource(Recovery.on_recovery_completed)
    resume = source.index("consumer.resume_partitions(")
    seek = source.index("consumer.perform_seek()")
    assert resume < seek
    assert "self.app.flow_control.resume()" in source[seek:]


# --- a fetch takes from aiokafka only what Faust will hand over -----------------------------------


@dataclass
class Record:
    offset: int


class BufferedFetcher:
    """aiokafka's fetcher as far as a fetch sees it: records buffered per partition, returned
    after a wait for every partition asked for, where an empty set means every partition (the
    rule of ``aiokafka.consumer.fetcher.Fetcher.fetched_records``)."""

    def __init__(self, buffered: dict[TP, list[Record]]) -> None:
        self.buffered = buffered
        self.waiting = asyncio.Event()
        self.answer = asyncio.Event()
        self._closed = False
        self._subscriptions = self

    @contextlib.contextmanager
    def fetch_context(self) -> Iterator[None]:
        yield

    async def fetched_records(
        self,
        partitions: Set[TP],
        timeout: float = 0,  # noqa: ASYNC109  # aiokafka's signature
        max_records: int | None = None,
    ) -> dict[TP, list[Record]]:
        self.waiting.set()
        await self.answer.wait()
        return {
            tp: records
            for tp, records in self.buffered.items()
            if not partitions or tp in partitions
        }


class FetchingConsumer:
    """The aiokafka consumer a fetch runs on: its fetcher, and the seeks it is given."""

    def __init__(self, fetcher: BufferedFetcher) -> None:
        self._fetcher = fetcher
        self._closed = False
        self._max_poll_records = 500
        self.seeks: list[tuple[TP, int]] = []

    def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


def fetching(consumer: RewindingConsumer, aiokafka_consumer: FetchingConsumer) -> Any:
    """The consumer's thread, running its calls on the test's loop."""
    thread = consumer._thread

    async def call_thread(method: Any, *args: Any, **kwargs: Any) -> Any:
        return await method(*args, **kwargs)

    thread.call_thread = call_thread
    thread._ensure_consumer = lambda: aiokafka_consumer
    return thread


async def test_a_fetch_under_way_when_faust_pauses_everything_takes_nothing_it_drops() -> None:
    """Faust fetches with its live set of active partitions; pausing them all while the fetch
    waits left aiokafka an empty set, which it reads as every partition: the request
    partition's records were drained, its position moved past them, and Faust dropped them."""
    consumer = consumer_of_an_app()
    fetcher = BufferedFetcher({REQUESTS: [Record(23), Record(24)], CHANGELOG: [Record(0)]})
    thread = fetching(consumer, FetchingConsumer(fetcher))
    active = {CHANGELOG}
    fetch = asyncio.create_task(thread.getmany(active, 1.0))
    await fetcher.waiting.wait()
    active.clear()  # Faust pauses the changelog at the end of its read
    fetcher.answer.set()
    records = await fetch
    assert REQUESTS not in records, "records of a paused partition were taken from aiokafka"
    assert records == {CHANGELOG: [Record(0)]}


async def test_a_fetch_with_nothing_active_asks_aiokafka_for_nothing() -> None:
    consumer = consumer_of_an_app()
    fetcher = BufferedFetcher({REQUESTS: [Record(3)]})
    fetcher.answer.set()
    thread = fetching(consumer, FetchingConsumer(fetcher))
    assert await thread.getmany(set(), 1.0) == {}
    assert not fetcher.waiting.is_set()


@pytest.mark.parametrize("change", ["flow stopped", "new generation"])
async def test_records_fetched_into_a_stopped_flow_or_a_new_generation_are_given_back(
    change: str,
) -> None:
    """Faust would drop them and only re-seek the request partitions; a changelog partition
    being recovered would never see them again."""
    consumer = consumer_of_an_app()
    fetcher = BufferedFetcher({CHANGELOG: [Record(0), Record(1)], REQUESTS: [Record(7)]})
    aiokafka_consumer = FetchingConsumer(fetcher)
    thread = fetching(consumer, aiokafka_consumer)
    fetch = asyncio.create_task(thread.getmany({CHANGELOG, REQUESTS}, 1.0))
    await fetcher.waiting.wait()
    if change == "flow stopped":
        consumer.stop_flow()
    else:
        consumer.app.consumer_generation_id += 1
    fetcher.answer.set()
    assert await fetch == {}
    assert sorted(aiokafka_consumer.seeks) == sorted([(CHANGELOG, 0), (REQUESTS, 7)])
