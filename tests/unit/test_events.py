"""parse_event: what each server-sent event of a Vapi chat stream means."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.vapi.events import (
    MALFORMED_REASONS,
    MalformedEvent,
    StreamDelta,
    StreamDone,
    parse_event,
)
from worker.vapi.sse import ServerSentEvent

pytestmark = pytest.mark.unit


def _event(data: str, *, event: str | None = None, id: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(event=event, data=data, id=id)


def _json(**document: object) -> ServerSentEvent:
    return _event(json.dumps(document, ensure_ascii=False))


def test_text_delta_is_parsed() -> None:
    """A chat.output[N].content event becomes a StreamDelta with chat id, path, text and session."""
    parsed = parse_event(
        _json(id="chat_1", sessionId="s_1", path="chat.output[0].content", delta="Hé ☃")
    )
    assert parsed == StreamDelta(
        chat_id="chat_1", path="chat.output[0].content", delta="Hé ☃", session_id="s_1"
    )


def test_session_id_is_optional() -> None:
    """Without sessionId (or with a non-string one) the delta's session_id is None."""
    plain = parse_event(_json(id="c", path="chat.output[0].content", delta="x"))
    odd = parse_event(_json(id="c", sessionId=5, path="chat.output[0].content", delta="x"))
    assert isinstance(plain, StreamDelta)
    assert plain.session_id is None
    assert isinstance(odd, StreamDelta)
    assert odd.session_id is None


@pytest.mark.parametrize("path", ["chat.output[1].content", "chat.output[12].content"])
def test_any_output_index_is_text(path: str) -> None:
    """Content of any output message is reply text."""
    assert isinstance(parse_event(_json(id="c", path=path, delta="x")), StreamDelta)


def test_empty_delta_is_still_a_delta() -> None:
    """An empty text fragment is a delta (it carries the chat id); the caller decides to skip it."""
    parsed = parse_event(_json(id="c", path="chat.output[0].content", delta=""))
    assert parsed == StreamDelta(chat_id="c", path="chat.output[0].content", delta="")


def test_unknown_fields_are_ignored() -> None:
    """Extra fields Vapi may add do not disturb parsing."""
    parsed = parse_event(_json(id="c", path="chat.output[0].content", delta="x", extra=[1]))
    assert isinstance(parsed, StreamDelta)


@pytest.mark.parametrize(
    "path",
    [
        "chat.output[0].role",
        "chat.output[0].tool_calls[0].function.arguments",
        "chat.messages[0].content",
        "chat.output[].content",
        "chat.output[0].content.extra",
        "xchat.output[0].content",
        "",
    ],
)
def test_other_paths_are_ignored(path: str) -> None:
    """Events for paths that are not reply text are ignored, whatever their delta's type."""
    assert parse_event(_json(id="c", path=path, delta="x")) is None
    assert parse_event(_json(id="c", path=path, delta={"name": "f"})) is None


@pytest.mark.parametrize("data", ["[DONE]", " [DONE] ", "[DONE]\n"])
def test_done_marker(data: str) -> None:
    """data: [DONE] (surrounding whitespace allowed) ends the stream."""
    assert parse_event(_event(data)) == StreamDone()


def test_done_is_recognised_whatever_the_event_name() -> None:
    """The event: name is not consulted; [DONE] under another name is still done."""
    assert parse_event(_event("[DONE]", event="done", id="9")) == StreamDone()


@pytest.mark.parametrize("data", ["", " ", "\n"])
def test_empty_data_is_nothing(data: str) -> None:
    """Events without data (keep-alives, id/retry-only events) mean nothing."""
    assert parse_event(_event(data)) is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("{not json", "not_json"),
        ("[DONE", "not_json"),
        ('{"id": "c", "delta": NaN}', "not_json"),
        ('{"id":"c","path":"chat.output[0].content","delta":"\\ud83d"}', "not_json"),
        ("[1, 2]", "not_object"),
        ('"text"', "not_object"),
        ("null", "not_object"),
        ('{"path": "chat.output[0].content", "delta": "x"}', "missing_id"),
        ('{"id": "", "path": "chat.output[0].content", "delta": "x"}', "missing_id"),
        ('{"id": 7, "path": "chat.output[0].content", "delta": "x"}', "missing_id"),
        ('{"id": "c", "delta": "x"}', "missing_path"),
        ('{"id": "c", "path": null, "delta": "x"}', "missing_path"),
        ('{"id": "c", "path": "chat.output[0].content"}', "missing_delta"),
        ('{"id": "c", "path": "chat.output[0].content", "delta": 5}', "missing_delta"),
    ],
)
def test_malformed_events_say_why(data: str, reason: str) -> None:
    """Data that is not Vapi's event shape is a MalformedEvent with a fixed reason code."""
    assert parse_event(_event(data)) == MalformedEvent(reason)
    assert reason in MALFORMED_REASONS


def test_paired_surrogate_escapes_decode_to_one_character() -> None:
    """An emoji sent as a \\u surrogate pair is one character of text."""
    data = '{"id":"c","path":"chat.output[0].content","delta":"\\ud83d\\ude00"}'
    parsed = parse_event(_event(data))
    assert isinstance(parsed, StreamDelta)
    assert parsed.delta == "😀"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_data_gives_a_known_outcome(data: str) -> None:
    """Any data string parses to a delta, done, a known malformed reason, or nothing."""
    parsed = parse_event(_event(data))
    if isinstance(parsed, MalformedEvent):
        assert parsed.reason in MALFORMED_REASONS
    else:
        assert parsed is None or isinstance(parsed, StreamDelta | StreamDone)


@settings(max_examples=200, deadline=None)
@given(chat_id=st.text(min_size=1), delta=st.text(), index=st.integers(0, 999))
def test_round_trips_any_text(chat_id: str, delta: str, index: int) -> None:
    """Whatever id and text Vapi sends, the delta carries them back unchanged."""
    path = f"chat.output[{index}].content"
    parsed = parse_event(_json(id=chat_id, path=path, delta=delta))
    assert parsed == StreamDelta(chat_id=chat_id, path=path, delta=delta)
