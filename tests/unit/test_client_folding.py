"""The client's delta stream folding (``vapi_stream_client.folding``): duplicates dropped, restarted
streams marked, the final response's stream as the answer. Pure: records in, events out."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vapi_stream_client import (
    ChatDelta,
    ChatResponse,
    Delta,
    Event,
    Response,
    Restart,
    StreamFolder,
)

pytestmark = pytest.mark.unit


def delta(
    seq: int, text: str, *, attempt: int = 1, chat: str = "chat-1", request: str = "r1"
) -> ChatDelta:
    return ChatDelta(
        request_id=request,
        conversation_id=f"conversation-of-{request}",
        chat_id=chat,
        attempt=attempt,
        seq=seq,
        delta=text,
        ts=1.0,
    )


def response(text: str, *, chat: str | None = "chat-1", request: str = "r1") -> ChatResponse:
    return ChatResponse.model_validate(
        {
            "request_id": request,
            "conversation_id": f"conversation-of-{request}",
            "chat_id": chat,
            "previous_chat_id": None,
            "status": "completed",
            "text": text,
            "delta_count": len(text),
            "attempts": 1,
            "context_reset": False,
            "error": None,
            "timings": {"queued_ms": 0, "first_delta_ms": None, "total_ms": 1},
            "metadata": None,
        }
    )


def fold(folder: StreamFolder, records: list[ChatDelta | ChatResponse]) -> list[Event]:
    events: list[Event] = []
    for record in records:
        if isinstance(record, ChatDelta):
            events += folder.on_delta(record)
        else:
            events += folder.on_response(record)
    return events


def shown(events: list[Event], request: str = "r1") -> str:
    """The text a reader shows for ``request``: deltas appended, a restart clears it."""
    text = ""
    for event in events:
        if event.request_id != request:
            continue
        if isinstance(event, Restart):
            text = ""
        elif isinstance(event, Delta):
            text += event.text
    return text


def test_a_redelivered_delta_is_dropped() -> None:
    """The same (request_id, attempt, chat_id, seq) twice makes one Delta."""
    events = fold(StreamFolder(), [delta(0, "Hi"), delta(1, "!"), delta(0, "Hi"), delta(1, "!")])
    assert [e.text for e in events if isinstance(e, Delta)] == ["Hi", "!"]


def test_a_retry_and_a_crash_rerun_each_restart_the_stream() -> None:
    """A new attempt (a retry), and attempt 1 again on a new chat id (a run after a crash), each
    make one Restart before their first Delta; the earlier streams' text is void."""
    events = fold(
        StreamFolder(),
        [
            delta(0, "Hel"),
            delta(0, "Hello", attempt=2, chat="chat-2"),
            delta(0, "Hello!", attempt=1, chat="chat-3"),
        ],
    )
    restarts = [e for e in events if isinstance(e, Restart)]
    assert [(r.attempt, r.chat_id, r.reason) for r in restarts] == [
        (2, "chat-2", "new_stream"),
        (1, "chat-3", "new_stream"),
    ]
    assert isinstance(events[2], Delta)
    assert shown(events) == "Hello!"


def test_a_replaced_streams_late_delta_is_void() -> None:
    """Once a stream is replaced, its deltas are dropped, also those with a seq not seen yet."""
    events = fold(
        StreamFolder(),
        [
            delta(0, "A"),
            delta(0, "B", attempt=2),
            delta(1, "late", attempt=1),
            delta(1, "b", attempt=2),
        ],
    )
    assert shown(events) == "Bb"
    assert sum(isinstance(e, Restart) for e in events) == 1


def test_the_response_naming_another_stream_voids_the_text_shown() -> None:
    """The final response's chat_id names the answer: when the stream shown is another, a
    Restart comes before the Response, which carries the answer's text."""
    events = fold(StreamFolder(), [delta(0, "old"), response("new", chat="chat-9")])
    assert isinstance(events[1], Restart)
    assert events[1].reason == "answer_is_another_stream"
    assert events[1].chat_id == "chat-9"
    assert isinstance(events[2], Response)
    assert events[2].response.text == "new"


def test_a_response_to_the_stream_shown_is_just_the_response() -> None:
    """No restart when the response names the stream that was shown, nor for a failed one."""
    events = fold(StreamFolder(), [delta(0, "Hi"), response("Hi")])
    assert [type(e) for e in events] == [Delta, Response]
    failed = response("", chat=None).model_copy(
        update={"status": "failed", "request_id": "r2", "conversation_id": "c2"}
    )
    assert [type(e) for e in StreamFolder().on_response(failed)] == [Response]


def test_a_run_after_the_response_is_a_restart_and_its_response_the_answer() -> None:
    """In the residual window (design §5.3) a request runs again after its response: the new
    stream shows as a restart, and both responses are passed on (the last is the answer)."""
    events = fold(
        StreamFolder(),
        [
            delta(0, "one"),
            response("one"),
            delta(0, "two", chat="chat-2"),
            response("two", chat="chat-2"),
        ],
    )
    assert [type(e) for e in events] == [Delta, Response, Restart, Delta, Response]


def test_requests_are_folded_independently() -> None:
    """Two requests' streams interleave without restarting each other."""
    events = fold(
        StreamFolder(),
        [delta(0, "a", request="r1"), delta(0, "x", request="r2"), delta(1, "b", request="r1")],
    )
    assert not any(isinstance(e, Restart) for e in events)
    assert shown(events, "r1") == "ab"
    assert shown(events, "r2") == "x"


def test_the_memory_is_bounded_least_recently_used_first_out() -> None:
    """Past ``max_requests`` requests the oldest is forgotten: its duplicate is not recognised,
    while a recently used one still is."""
    folder = StreamFolder(max_requests=2)
    fold(folder, [delta(0, "a", request="r1"), delta(0, "b", request="r2")])
    fold(folder, [delta(0, "a", request="r1")])  # r1 used again: r2 is now the oldest
    fold(folder, [delta(0, "c", request="r3")])
    assert folder.on_delta(delta(0, "a", request="r1")) == []
    assert len(folder.on_delta(delta(0, "b", request="r2"))) == 1
    with pytest.raises(ValueError, match="max_requests"):
        StreamFolder(max_requests=0)


@dataclass(frozen=True)
class Run:
    """One request's streams as the worker published them, and its final response."""

    request: str
    streams: list[list[str]]

    def records(self) -> list[ChatDelta | ChatResponse]:
        out: list[ChatDelta | ChatResponse] = []
        for number, texts in enumerate(self.streams):
            # Retries and reruns alike: a new (attempt, chat_id); some reruns repeat attempt 1.
            attempt, chat = 1 + number % 2, f"{self.request}-chat-{number}"
            out += [
                delta(seq, text, attempt=attempt, chat=chat, request=self.request)
                for seq, text in enumerate(texts)
            ]
        final = f"{self.request}-chat-{len(self.streams) - 1}"
        out.append(response("".join(self.streams[-1]), chat=final, request=self.request))
        return out


runs = st.lists(
    st.lists(
        st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=4), min_size=1, max_size=3
    ),
    min_size=1,
    max_size=4,
).map(lambda many: [Run(f"r{n}", streams) for n, streams in enumerate(many)])


@settings(max_examples=200, deadline=None)
@given(runs=runs, data=st.data())
def test_interleaved_redelivered_streams_fold_to_the_answer(
    runs: list[Run], data: st.DataObject
) -> None:
    """Any interleaving of requests (each in its own order, as on a partition), with copies of
    earlier records redelivered later: each request shows exactly its final stream's text, once,
    with one Restart per replaced stream, and its Response last."""
    queues = {run.request: run.records() for run in runs}
    delivered: list[ChatDelta | ChatResponse] = []
    history: dict[str, list[ChatDelta | ChatResponse]] = {run.request: [] for run in runs}
    while any(queues.values()):
        request = data.draw(st.sampled_from(sorted(r for r, q in queues.items() if q)))
        if history[request] and data.draw(st.booleans()):
            copy = data.draw(st.sampled_from(history[request]))
            if isinstance(copy, ChatDelta):
                delivered.append(copy)  # a redelivered delta (never a second response here)
                continue
        record = queues[request].pop(0)
        history[request].append(record)
        delivered.append(record)
    events = fold(StreamFolder(), delivered)
    for run in runs:
        mine = [e for e in events if e.request_id == run.request]
        assert shown(mine, run.request) == "".join(run.streams[-1])
        assert sum(isinstance(e, Restart) for e in mine) == len(run.streams) - 1
        assert isinstance(mine[-1], Response)
        assert sum(isinstance(e, Response) for e in mine) == 1
