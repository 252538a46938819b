"""ConversationState: which redelivered records count as finished, and the table value's format."""

from __future__ import annotations

from typing import Any

import pytest

from worker.state import (
    ConversationState,
    SourcePosition,
    value_last_active_ms,
    with_last_active,
)

T0 = 1_700_000_000_000  # a record timestamp, ms


def at(offset: int, *, partition: int = 3, timestamp_ms: int | None = None) -> SourcePosition:
    """The position of a record at ``offset``; timestamps grow with offsets unless given."""
    return SourcePosition(partition, offset, T0 + offset if timestamp_ms is None else timestamp_ms)


def finish(state: ConversationState, turns: range, *, keep: int = 4) -> ConversationState:
    """``state`` after the turns at these offsets finished, each request ``r<offset>``."""
    for offset in turns:
        state = state.after_request(
            f"r{offset}", f"chat{offset}", None, keep=keep, source=at(offset)
        )
    return state


def test_a_record_at_or_before_the_last_finished_offset_counts_as_finished_however_old() -> None:
    state = finish(ConversationState(), range(10, 110))
    assert state.finished == ("r106", "r107", "r108", "r109")
    assert state.last_finished == at(109)
    for offset in (10, 11, 50, 105, 109):
        assert state.has_finished(f"r{offset}", at(offset)), offset


def test_a_record_past_the_last_finished_offset_has_not_finished() -> None:
    state = finish(ConversationState(), range(10, 20))
    assert not state.has_finished("r20", at(20))
    assert not state.has_finished("r500", at(500))


def test_without_a_position_only_the_remembered_ids_count() -> None:
    state = finish(ConversationState(), range(10, 20))
    assert state.has_finished("r19")
    assert not state.has_finished("r10")  # out of the id window, and no position given


def test_a_request_produced_twice_is_recognised_by_its_id_at_a_later_offset() -> None:
    state = finish(ConversationState(), range(10, 20))
    assert state.has_finished("r18", at(25))


def test_a_record_of_another_partition_is_not_compared_by_offset() -> None:
    state = finish(ConversationState(), range(10, 20))
    assert not state.has_finished("r12", at(12, partition=4))


def test_a_state_without_a_position_recognises_by_id_only_then_starts_one() -> None:
    state = ConversationState(chat_id="chat9", finished=("r9",))
    assert not state.has_finished("r5", at(5))
    assert state.has_finished("r9", at(9))
    state = state.after_request("r10", "chat10", None, keep=4, source=at(10))
    assert state.last_finished == at(10)
    assert state.has_finished("r5", at(5))


def test_a_record_of_a_recreated_topic_is_not_taken_for_a_redelivery() -> None:
    """Offsets restart at 0, timestamps do not: the new topic's low offsets run."""
    state = finish(ConversationState(), range(100, 200))
    later = T0 + 10_000
    fresh = at(3, timestamp_ms=later)
    assert not state.has_finished("n3", fresh)
    state = state.after_request("n3", "chat-n3", None, keep=4, source=fresh)
    assert state.last_finished == fresh  # the position starts over on the new topic
    assert not state.has_finished("n4", at(4, timestamp_ms=later + 1))
    assert not state.has_finished("n150", at(150, timestamp_ms=later + 2))
    assert state.has_finished("n3", fresh)


def test_the_newest_timestamp_is_kept_so_a_skewed_earlier_record_still_counts() -> None:
    """A clock ahead gives an earlier offset a later timestamp: it finished all the same."""
    state = finish(ConversationState(), range(10, 12))
    skewed = at(12, timestamp_ms=T0 + 5_000)
    state = state.after_request("r12", "chat12", None, keep=4, source=skewed)
    state = finish(state, range(13, 20))
    assert state.last_finished == SourcePosition(3, 19, T0 + 5_000)
    assert state.has_finished("r12", skewed)


def test_a_request_finished_without_a_position_keeps_the_last_one() -> None:
    state = finish(ConversationState(), range(10, 20))
    state = state.after_request("r20", "chat20", None, keep=4)
    assert state.last_finished == at(19)
    assert state.chat_id == "chat20"


def test_the_table_value_round_trips() -> None:
    state = finish(ConversationState(session_id="s1"), range(10, 20))
    value = state.to_json()
    assert value["last_finished"] == {"partition": 3, "offset": 19, "timestamp_ms": T0 + 19}
    assert ConversationState.from_json(value) == state


def test_a_value_written_before_positions_existed_reads_as_no_position_known() -> None:
    old = {"chat_id": "chat1", "session_id": None, "finished": ["r1", "r2"]}
    state = ConversationState.from_json(old)
    assert state == ConversationState(chat_id="chat1", finished=("r1", "r2"))
    assert state.last_finished is None


@pytest.mark.parametrize(
    "stored",
    [
        None,
        "3:19",
        [3, 19, T0],
        {"partition": 3, "offset": 19},
        {"partition": 3, "offset": "19", "timestamp_ms": T0},
        {"partition": 3, "offset": 19.0, "timestamp_ms": T0},
        {"partition": True, "offset": 19, "timestamp_ms": T0},
        {"partition": 3, "offset": -1, "timestamp_ms": T0},
    ],
)
def test_an_unreadable_position_reads_as_no_position_known(stored: Any) -> None:
    value = {"chat_id": "chat1", "finished": ["r1"], "last_finished": stored}
    state = ConversationState.from_json(value)
    assert state.last_finished is None
    assert state.chat_id == "chat1"


def test_a_finished_request_stamps_when_the_conversation_was_last_active() -> None:
    state = ConversationState().after_request("r1", "chat1", None, keep=4, active_ms=T0)
    assert state.last_active_ms == T0
    state = state.after_request("r2", None, None, keep=4, active_ms=T0 + 5)  # a failed turn
    assert state.last_active_ms == T0 + 5
    assert state.after_request("r3", "c", None, keep=4).last_active_ms == T0 + 5


def test_last_active_survives_the_table_format() -> None:
    state = finish(ConversationState(), range(1, 3)).after_request(
        "r9", "chat9", None, keep=4, active_ms=T0
    )
    assert ConversationState.from_json(state.to_json()) == state


@pytest.mark.parametrize("stored", [None, "x", -1, True, 1.5])
def test_a_value_without_a_readable_last_active_time_reads_as_not_known(stored: Any) -> None:
    value = {**finish(ConversationState(), range(1, 3)).to_json(), "last_active_ms": stored}
    assert ConversationState.from_json(value).last_active_ms is None
    del value["last_active_ms"]  # written before the field existed
    assert ConversationState.from_json(value).last_active_ms is None
    assert value_last_active_ms(value) is None


def test_a_value_written_before_last_active_existed_takes_its_record_time() -> None:
    old = {"chat_id": "chat1", "session_id": None, "finished": ["r1"], "last_finished": None}
    stamped = with_last_active(old, T0)
    assert stamped == {**old, "last_active_ms": T0}
    assert "last_active_ms" not in old  # a new dict: the caller's value is not changed
    assert ConversationState.from_json(stamped).last_active_ms == T0


def test_a_value_with_a_last_active_time_keeps_it() -> None:
    value = ConversationState(chat_id="c", last_active_ms=T0).to_json()
    assert with_last_active(value, T0 + 99) is value
    assert with_last_active("junk", T0) == "junk"
