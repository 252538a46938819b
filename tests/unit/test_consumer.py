"""The rewinding consumer: which partitions it rewinds, and the Faust internals it relies on."""

from __future__ import annotations

import inspect

import pytest
from aiokafka import TopicPartition
from faust.transport.consumer import ThreadDelegateConsumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer

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
