"""The rewinding consumer: which partitions it rewinds, and the Faust internals it relies on."""

from __future__ import annotations

import inspect

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
