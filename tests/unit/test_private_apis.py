"""Every private interface of Faust and aiokafka the worker uses still exists, as it is used.

faust-streaming is pinned and aiokafka held below 0.15 because the worker reaches into their
private parts (docs/design.md §10.4, all of them in ``worker/kafka_adapters.py``). An upgrade
that removes, renames or reshapes one of them fails here, by name, instead of in production.
Every name marked ``# noqa: SLF001`` in ``worker/``, and every private override, must have its
check below, and none of them may appear in another module of ``worker/``.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import faust
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.producer.message_accumulator import MessageAccumulator, MessageBatch
from aiokafka.structs import TopicPartition
from faust.stores.memory import Store as MemoryStore
from faust.tables.base import Collection
from faust.tables.recovery import Recovery
from faust.topics import Topic
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as FaustAIOKafkaConsumer
from faust.transport.drivers.aiokafka import Producer as FaustProducer
from mode.utils.queues import FlowControlEvent

from worker.kafka_adapters import (
    FaustApp,
    IdempotentProducer,
    RewindingConsumer,
    StateTable,
    TableStore,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
#: A private attribute of another object (``self._x`` is the class's own).
PRIVATE_USE = re.compile(r"(?<!\bself)\._([a-z]\w*)")


@pytest.fixture
async def producer() -> AsyncIterator[AIOKafkaProducer]:
    """An idempotent aiokafka producer, never started (nothing is sent)."""
    made = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", enable_idempotence=True)
    yield made
    await made.client.close()


def _source(obj: Any) -> str:
    return inspect.getsource(obj)


def _params(func: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(func).parameters)


# --- aiokafka's producer -------------------------------------------------------------------------


async def check_message_accumulator(producer: AIOKafkaProducer) -> None:
    accumulator = producer._message_accumulator
    assert isinstance(accumulator, MessageAccumulator)
    # send_delta: add_message(tp, key, value, timeout, headers=...) returns the ack future.
    assert _params(accumulator.add_message)[:4] == ["tp", "key", "value", "timeout"]
    assert "headers" in _params(accumulator.add_message)


async def check_request_timeout_ms(producer: AIOKafkaProducer) -> None:
    assert isinstance(producer._request_timeout_ms, int)
    assert "self._request_timeout_ms / 1000" in _source(AIOKafkaProducer.send)


async def check_txn_manager(producer: AIOKafkaProducer) -> None:
    # Idempotent: a manager without a transactional id; send refuses records without one only
    # on a transactional producer.
    assert producer._txn_manager is not None
    assert producer._txn_manager.transactional_id is None


async def check_sender(producer: AIOKafkaProducer) -> None:
    assert hasattr(producer._sender, "sender_task")
    assert producer._sender.sender_task is None  # not started


async def check_conns(producer: AIOKafkaProducer) -> None:
    assert isinstance(producer.client._conns, dict)


async def check_batches(producer: AIOKafkaProducer) -> None:
    accumulator = producer._message_accumulator
    assert isinstance(accumulator._batches, dict)  # per partition, a deque of batches
    assert callable(accumulator.fail_all)


async def check_pending_batches(producer: AIOKafkaProducer) -> None:
    assert isinstance(producer._message_accumulator._pending_batches, set)


async def check_msg_futures(producer: AIOKafkaProducer) -> None:
    builder = producer._message_accumulator.create_builder()
    batch = MessageBatch(TopicPartition("t", 0), builder, 10, 0)
    assert batch._msg_futures == []
    assert (batch.retry_count, batch.record_count, batch.tp) == (0, 0, TopicPartition("t", 0))


# --- Faust's producer, consumer, app and table ---------------------------------------------------


async def check_ensure_producer(producer: AIOKafkaProducer) -> None:
    # KafkaPublisher's accessor of the aiokafka producer; the consumer thread's of its consumer.
    assert _params(FaustProducer._ensure_producer) == ["self"]
    assert _params(AIOKafkaConsumerThread._ensure_consumer) == ["self"]


async def check_ensure_consumer(producer: AIOKafkaProducer) -> None:
    await check_ensure_producer(producer)


async def check_settings_extra(producer: AIOKafkaProducer) -> None:
    assert "_settings_extra" in vars(FaustProducer)
    assert "self._settings_extra()" in _source(FaustProducer._new_producer)
    assert IdempotentProducer._settings_extra(IdempotentProducer.__new__(IdempotentProducer)) == {
        "acks": "all",
        "enable_idempotence": True,
    }


async def check_new_consumer_thread(producer: AIOKafkaProducer) -> None:
    assert "_new_consumer_thread" in vars(FaustAIOKafkaConsumer)
    assert issubclass(RewindingConsumer, FaustAIOKafkaConsumer)


async def check_fetch_records(producer: AIOKafkaProducer) -> None:
    # RewindingConsumerThread._fetch_asked runs Faust's in-thread fetch with its own set.
    assert _params(AIOKafkaConsumerThread._fetch_records) == [
        "self",
        "consumer",
        "active_partitions",
        "timeout",
        "max_records",
    ]
    assert "fetcher.fetched_records(" in _source(AIOKafkaConsumerThread._fetch_records)
    assert "self._fetch_records" in _source(AIOKafkaConsumerThread.getmany)
    # What the copy of the set answers: aiokafka reads an empty set as every partition.
    assert "if partitions and tp not in partitions:" in _source(Fetcher.fetched_records)


async def check_max_poll_records(producer: AIOKafkaProducer) -> None:
    assert "max_records=_consumer._max_poll_records" in _source(AIOKafkaConsumerThread.getmany)


async def check_consumer_wait_empty(producer: AIOKafkaProducer) -> None:
    assert _params(faust.App._consumer_wait_empty) == ["self", "consumer", "logger"]
    assert "_consumer_wait_empty" in vars(FaustApp)
    assert "self._consumer_wait_empty(" in _source(faust.App)


async def check_unacked_messages(producer: AIOKafkaProducer) -> None:
    # The dispatcher discards from ``consumer.unacked``: Faust's own set, which its drain waits
    # to empty, not a copy of it.
    assert "return cast(Set[Message], self._unacked_messages)" in _source(
        FaustConsumer.unacked.fget
    )
    assert "self._unacked_messages" in _source(FaustConsumer.wait_empty)


async def check_on_changelog_sent(producer: AIOKafkaProducer) -> None:
    assert _params(Collection._on_changelog_sent) == ["self", "fut"]
    assert "set_persisted_offset" in _source(Collection._on_changelog_sent)


async def check_new_store(producer: AIOKafkaProducer) -> None:
    assert "_new_store" in vars(StateTable)
    assert "self._new_store()" in _source(Collection)
    assert "self._store = " in _source(Collection.__init__)


async def check_key_partition(producer: AIOKafkaProducer) -> None:
    assert issubclass(TableStore, MemoryStore)
    assert "self._key_partition" in _source(MemoryStore)


async def check_recovery_started_at(producer: AIOKafkaProducer) -> None:
    # recovery_progress: a recovery's start time, set (monotonic) at every start, so that a new
    # one is told apart from one that stalled; in_recovery and active_remaining() beside it.
    assert Recovery._recovery_started_at is None
    assert "self._recovery_started_at = monotonic()" in _source(Recovery._set_recovery_started)
    assert "self.in_recovery = True" in _source(Recovery._set_recovery_started)
    assert "self.in_recovery = False" in _source(Recovery._set_recovery_ended)
    assert _params(Recovery.active_remaining) == ["self"]
    assert "highwater - offsets[tp]" in _source(Recovery.active_remaining)


async def check_flow_control(producer: AIOKafkaProducer) -> None:
    assert callable(FlowControlEvent.resume)
    assert callable(FlowControlEvent.is_active)


async def check_topic_send_force(producer: AIOKafkaProducer) -> None:
    assert "force" in _params(Topic.send)


#: Per private name the worker uses (without its underscore), its check.
CHECKS: dict[str, Callable[[AIOKafkaProducer], Any]] = {
    "message_accumulator": check_message_accumulator,
    "request_timeout_ms": check_request_timeout_ms,
    "txn_manager": check_txn_manager,
    "sender": check_sender,
    "conns": check_conns,
    "batches": check_batches,
    "pending_batches": check_pending_batches,
    "msg_futures": check_msg_futures,
    "ensure_producer": check_ensure_producer,
    "ensure_consumer": check_ensure_consumer,
    "settings_extra": check_settings_extra,
    "new_consumer_thread": check_new_consumer_thread,
    "fetch_records": check_fetch_records,
    "max_poll_records": check_max_poll_records,
    "consumer_wait_empty": check_consumer_wait_empty,
    "unacked_messages": check_unacked_messages,
    "on_changelog_sent": check_on_changelog_sent,
    "new_store": check_new_store,
    "key_partition": check_key_partition,
    "recovery_started_at": check_recovery_started_at,
}

#: Private names used on ``self`` (overrides and inherited parts), which no noqa marks.
SELF_USES = {
    "settings_extra",
    "fetch_records",
    "consumer_wait_empty",
    "new_consumer_thread",
    "ensure_consumer",
    "on_changelog_sent",
    "new_store",
    "key_partition",
}


@pytest.mark.parametrize("name", sorted(CHECKS))
async def test_the_private_interface_is_still_there(name: str, producer: AIOKafkaProducer) -> None:
    result = CHECKS[name](producer)
    if asyncio.iscoroutine(result):
        await result


async def test_the_public_interfaces_relied_on_in_the_same_spirit(
    producer: AIOKafkaProducer,
) -> None:
    """``Topic.send(force=)`` and the flow control's ``resume``/``is_active``."""
    await check_topic_send_force(producer)
    await check_flow_control(producer)


def test_every_private_use_in_worker_has_a_check() -> None:
    """Each name marked ``# noqa: SLF001`` in worker/, and each private use on ``self``, is
    checked above; the marked ones all live in worker/kafka_adapters.py."""
    marked: dict[str, set[str]] = {}
    for path in sorted((ROOT / "worker").rglob("*.py")):
        for line in path.read_text("utf-8").splitlines():
            if "noqa: SLF001" in line:
                for name in PRIVATE_USE.findall(line.split("#", 1)[0]):
                    marked.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert marked, "no private use is marked"
    unchecked = (set(marked) | SELF_USES) - set(CHECKS)
    assert not unchecked, f"private uses without a check here: {sorted(unchecked)}"
    elsewhere = {
        name: files for name, files in marked.items() if files - {"worker/kafka_adapters.py"}
    }
    assert not elsewhere, f"private uses outside worker/kafka_adapters.py: {elsewhere}"


def test_no_private_override_outside_the_adapter_module() -> None:
    """The private names used on ``self`` (Faust's overridden or inherited private parts) appear
    in worker/kafka_adapters.py and in no other module of worker/."""
    names = re.compile(r"\b_(" + "|".join(sorted(SELF_USES)) + r")\b")
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "worker").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        for name in names.findall(path.read_text("utf-8")):
            found.setdefault(name, set()).add(relative)
    assert set(found) == SELF_USES, f"self uses not found at all: {sorted(SELF_USES - set(found))}"
    elsewhere = {
        name: files for name, files in found.items() if files - {"worker/kafka_adapters.py"}
    }
    assert not elsewhere, f"private overrides outside worker/kafka_adapters.py: {elsewhere}"
