"""Unit tests for the simulator's conversation memory and counters."""

from __future__ import annotations

import pytest

from worker.simulator.errors import ChatRejectedError
from worker.simulator.state import SimulatorState, Stats
from worker.simulator.validation import CreateChatBody

pytestmark = pytest.mark.unit


def _turn(state: SimulatorState, request: CreateChatBody, reply: str) -> str:
    context = state.resolve_context(request)
    chat = state.new_chat(
        request, context, [{"role": "user", "content": str(request.input)}], reply
    )
    state.commit(chat)
    return chat.id


def test_previous_chat_continues_its_transcript() -> None:
    """A chat continued by ``previousChatId`` starts from the earlier chat's whole transcript."""
    state = SimulatorState()
    first = _turn(state, CreateChatBody(input="one", assistant_id="a"), "r1")
    context = state.resolve_context(CreateChatBody(input="two", previous_chat_id=first))
    assert [m["content"] for m in context.history] == ["one", "r1"]
    assert context.assistant_id == "a"


def test_unknown_previous_chat_is_404_and_other_assistant_is_400() -> None:
    """An unknown chat id is not found; a known one under another assistant is refused."""
    state = SimulatorState()
    first = _turn(state, CreateChatBody(input="one", assistant_id="a"), "r1")
    with pytest.raises(ChatRejectedError) as missing:
        state.resolve_context(
            CreateChatBody(input="x", assistant_id="a", previous_chat_id="chat_no")
        )
    assert missing.value.status == 404
    with pytest.raises(ChatRejectedError) as other:
        state.resolve_context(CreateChatBody(input="x", assistant_id="b", previous_chat_id=first))
    assert other.value.status == 400


def test_uncommitted_chat_cannot_be_continued() -> None:
    """A chat whose stream broke is never committed, so continuing it is a 404."""
    state = SimulatorState()
    request = CreateChatBody(input="one", assistant_id="a")
    chat = state.new_chat(request, state.resolve_context(request), [], "r")
    with pytest.raises(ChatRejectedError):
        state.resolve_context(CreateChatBody(input="x", previous_chat_id=chat.id))


def test_sessions_keep_history_and_their_assistant() -> None:
    """A session is created on first use, grows with each turn and stays with one assistant."""
    state = SimulatorState()
    _turn(state, CreateChatBody(input="one", assistant_id="a", session_id="s"), "r1")
    _turn(state, CreateChatBody(input="two", session_id="s"), "r2")
    context = state.resolve_context(CreateChatBody(input="three", assistant_id="a", session_id="s"))
    assert [m["content"] for m in context.history] == ["one", "r1", "two", "r2"]
    with pytest.raises(ChatRejectedError) as other:
        state.resolve_context(CreateChatBody(input="x", assistant_id="b", session_id="s"))
    assert other.value.status == 400
    with pytest.raises(ChatRejectedError) as unknown:
        state.resolve_context(CreateChatBody(input="x", session_id="new"))
    assert unknown.value.status == 404


def test_stats_track_the_peak_and_reset_to_the_current_level() -> None:
    """The peak is the most streams open at once; a reset restarts it from what is open now."""
    stats = Stats()
    for _ in range(3):
        stats.stream_opened()
    stats.stream_closed()
    assert (stats.streams_in_flight, stats.peak_streams_in_flight) == (2, 3)
    stats.reset()
    assert (stats.calls, stats.peak_streams_in_flight) == (0, 2)
