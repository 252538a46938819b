"""The chat-state table's memory store: it knows every key's partition and keeps only its own.

No broker: a Faust app that is never started, its table, and changelog records as recovery hands
them over (key, value, and the message's partition, timestamp and raw value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import faust
import pytest
from faust.types import TP

from worker.kafka_adapters import StateTable, TableStore
from worker.state import ConversationState

pytestmark = pytest.mark.unit

T0 = 1_700_000_000.0  # a changelog record's timestamp, s


@dataclass
class Message:
    partition: int
    value: bytes | None
    timestamp: float = T0
    offset: int = 0


@dataclass
class Record:
    """A changelog event as recovery applies it."""

    key: str
    value: Any
    message: Message


def record(key: str, value: Any, partition: int, timestamp: float = T0, offset: int = 0) -> Record:
    raw = None if value is None else b"{}"
    return Record(key, value, Message(partition, raw, timestamp, offset))


@pytest.fixture
def table() -> StateTable:
    app = faust.App("unit-store", broker="kafka://127.0.0.1:1", store="memory://", Table=StateTable)
    return cast(StateTable, app.Table("chat-state", partitions=4, key_type=str))


@pytest.fixture
def store(table: StateTable) -> TableStore:
    return table.store


def apply(table: StateTable, *records: Record) -> None:
    table.apply_changelog_batch(records)  # type: ignore[arg-type]


def value(last_active_ms: int | None = 1) -> dict[str, Any]:
    return ConversationState(chat_id="chat", last_active_ms=last_active_ms).to_json()


def test_the_table_keeps_its_values_in_the_store_that_knows_partitions(
    table: StateTable, store: TableStore
) -> None:
    assert isinstance(table.data, TableStore)
    store.put("c1", value(), 3)
    assert table.get("c1") == value()
    assert store.partition_of("c1") == 3


def test_recovery_applies_values_and_tombstones_in_order(
    table: StateTable, store: TableStore
) -> None:
    apply(
        table,
        record("a", value(1), 0),
        record("b", value(2), 1),
        record("a", None, 0),  # a tombstone deletes
        record("b", None, 1),
        record("b", value(3), 1),  # written again after its tombstone: it stays
        record("gone", None, 2),  # a tombstone of a key never seen
    )
    assert dict(store.data) == {"b": value(3)}
    assert store.partition_of("a") is None
    assert store.partition_of("b") == 1


def test_a_recovered_value_without_last_active_takes_its_record_time(
    table: StateTable, store: TableStore
) -> None:
    old = {"chat_id": "chat", "session_id": None, "finished": ["r1"]}
    apply(table, record("old", old, 2, timestamp=T0), record("new", value(5), 2))
    assert ConversationState.from_json(store.data["old"]).last_active_ms == round(T0 * 1000)
    assert ConversationState.from_json(store.data["new"]).last_active_ms == 5


async def test_revoked_changelog_partitions_are_dropped_written_or_recovered(
    table: StateTable, store: TableStore
) -> None:
    """Keys written while running were never dropped before: they stayed for good."""
    changelog = table.changelog_topic.get_topic_name()
    apply(table, record("recovered-1", value(), 1), record("recovered-2", value(), 2))
    store.put("written-1", value(), 1)
    store.put("written-3", value(), 3)
    await store.on_rebalance(
        assigned={TP(changelog, 2), TP(changelog, 3)},
        revoked={TP(changelog, 1), TP("chat.requests", 2)},  # only the changelog's count
        newly_assigned=set(),
    )
    assert set(store.data) == {"recovered-2", "written-3"}
    assert store.partition_of("written-1") is None


async def test_at_the_end_of_recovery_only_active_partitions_stay(
    table: StateTable, store: TableStore
) -> None:
    changelog = table.changelog_topic.get_topic_name()
    store.put("written-0", value(), 0)
    store.put("written-2", value(), 2)
    apply(table, record("recovered-1", value(), 1))
    await store.on_recovery_completed(active_tps={TP(changelog, 2)}, standby_tps=set())
    assert set(store.data) == {"written-2"}


def test_removing_forgets_the_key_and_its_partition(store: TableStore) -> None:
    store.put("c", value(), 0)
    store.remove("c")
    store.remove("never there")
    assert "c" not in store.data
    assert store.partition_of("c") is None


async def own(table: StateTable, *partitions: int) -> str:
    """Assign these changelog partitions to the store, as a rebalance does; returns the topic."""
    changelog = table.changelog_topic.get_topic_name()
    await table.store.on_rebalance({TP(changelog, p) for p in partitions}, set(), set())
    return changelog


async def test_a_kept_partition_is_recovered_from_the_newest_record_held(
    table: StateTable, store: TableStore
) -> None:
    """Faust's memory store held no offsets: every rebalance read a kept partition from its
    beginning, all the worker had written since it started."""
    changelog = await own(table, 0, 1)
    apply(table, *(record(f"c{n}", value(), 0, offset=n) for n in range(5)))
    store.set_persisted_offset(TP(changelog, 1), 7)  # a write of this worker, acknowledged
    store.set_persisted_offset(TP(changelog, 1), 6)  # an older ack, arriving late
    assert store.persisted_offset(TP(changelog, 0)) == 4
    assert store.persisted_offset(TP(changelog, 1)) == 7
    assert store.persisted_offset(TP(changelog, 2)) is None

    recovery = table.app.tables.recovery  # type: ignore[attr-defined]
    for partition in (0, 1, 2):
        recovery.add_active(table, TP(changelog, partition))
    assert recovery.active_offsets[TP(changelog, 0)] == 4
    assert recovery.active_offsets[TP(changelog, 1)] == 7
    assert recovery.active_offsets[TP(changelog, 2)] is None  # from the beginning


async def test_a_revoked_partition_is_recovered_in_full_when_it_comes_back(
    table: StateTable, store: TableStore
) -> None:
    changelog = await own(table, 0, 1)
    apply(table, record("c", value(), 1, offset=9))
    await store.on_rebalance({TP(changelog, 0)}, {TP(changelog, 1)}, set())
    store.set_persisted_offset(TP(changelog, 1), 12)  # an ack that arrives after the revoke
    assert store.persisted_offset(TP(changelog, 1)) is None
    await store.on_rebalance({TP(changelog, 0), TP(changelog, 1)}, set(), {TP(changelog, 1)})
    assert store.persisted_offset(TP(changelog, 1)) is None
