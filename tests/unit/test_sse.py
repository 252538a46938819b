"""SSEStreamDecoder: SSE framing over any byte chunking (httpx-sse's cases, ported, and more)."""

from __future__ import annotations

import itertools
import json

import httpx
import pytest
from httpx_sse import EventSource
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import VapiProtocolError
from worker.vapi.sse import ServerSentEvent, SSEStreamDecoder

pytestmark = pytest.mark.unit

Event = tuple[str, str, str, int | None]


def _tuple(event: ServerSentEvent) -> Event:
    return (event.event, event.data, event.id, event.retry)


def _decode(*chunks: bytes) -> list[Event]:
    decoder = SSEStreamDecoder()
    events = [_tuple(e) for chunk in chunks for e in decoder.feed(chunk)]
    return events + [_tuple(e) for e in decoder.close()]


def _reference(body: bytes) -> list[Event]:
    """httpx-sse's own reading of a whole body, through httpx's text decoding."""
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    return [_tuple(e) for e in EventSource(response).iter_sse()]


def _split_everywhere(body: bytes) -> list[list[bytes]]:
    return [[body[:i], body[i:]] for i in range(len(body) + 1)]


# --- httpx-sse's decoder cases (tests/test_decoders.py), ported to byte chunks ---------------


def test_whatwg_example1_multi_line_data() -> None:
    """Consecutive data lines join with newlines into one event."""
    events = _decode(b"data: YH00\n", b"data: +2\n", b"data: 10\n", b"\n")
    assert events == [("message", "YH00\n+2\n10", "", None)]


def test_whatwg_example2_comments_and_ids() -> None:
    """Comments are skipped, id: sets and clears the id, one leading space is stripped."""
    events = _decode(
        b": test stream\n",
        b"\n",
        b"data: first event\n",
        b"id: 1\n",
        b"\n",
        b"data: second event\n",
        b"id\n",
        b"\n",
        b"data:  third event\n",
        b"\n",
    )
    assert events == [
        ("message", "first event", "1", None),
        ("message", "second event", "", None),
        ("message", " third event", "", None),
    ]


def test_whatwg_example3_empty_data_and_unterminated_event() -> None:
    """Bare data fields give empty data; an event not ended by a blank line is dropped at close."""
    events = _decode(b"data\n", b"\n", b"data\n", b"data\n", b"\n", b"data:\n")
    assert events == [("message", "", "", None), ("message", "\n", "", None)]


def test_whatwg_example4_space_after_colon_is_optional() -> None:
    """data:test and data: test carry the same value."""
    events = _decode(b"data:test\n", b"\n", b"data: test\n", b"\n")
    assert events == [("message", "test", "", None), ("message", "test", "", None)]


def test_event_field_names_the_event() -> None:
    """An event: field sets the event type."""
    events = _decode(b"event: logline\n", b"data: New user connected\n", b"\n")
    assert events == [("logline", "New user connected", "", None)]


def test_id_with_null_is_ignored() -> None:
    """An id containing NUL is ignored, as the specification requires."""
    assert _decode(b"data: test\n", b"id: 123\0\n", b"\n") == [("message", "test", "", None)]


def test_retry_field() -> None:
    """A numeric retry: field is read; an event with only retry is still dispatched."""
    assert _decode(b"retry: 10000\n", b"\n") == [("message", "", "", 10000)]


def test_invalid_retry_and_unknown_fields_are_ignored() -> None:
    """A non-numeric retry and unknown field names produce no event."""
    assert _decode(b"retry: 1667a\n", b"\n", b"something: ignore\n", b"\n") == []


def test_unicode_line_separator_is_not_a_newline() -> None:
    """U+2028 inside data is data, not a line break (httpx-sse issue 34)."""
    events = _decode(b'data: {"text":"Hello\xe2\x80\xa8World"}\n\n')
    assert events == [("message", '{"text":"Hello\u2028World"}', "", None)]


# --- line endings and chunk boundaries -------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"], ids=["LF", "CR", "CRLF"])
def test_every_line_ending_frames_events(eol: bytes) -> None:
    """LF, CR and CRLF all end lines and blank lines end events."""
    body = b"data: a" + eol + b"data: b" + eol + eol + b"data: c" + eol + eol
    assert _decode(body) == [("message", "a\nb", "", None), ("message", "c", "", None)]


def test_crlf_split_between_chunks_is_one_line_ending() -> None:
    """A CR at the end of one chunk and LF at the start of the next make one line break."""
    assert _decode(b"data: a\r", b"\n\r", b"\n") == [("message", "a", "", None)]


def test_line_split_mid_field() -> None:
    """A line cut anywhere, even inside the field name, is reassembled."""
    assert _decode(b"da", b"ta: hel", b"lo\n", b"\n") == [("message", "hello", "", None)]


def test_comment_only_stream_yields_nothing() -> None:
    """Keep-alive comments alone produce no events."""
    assert _decode(b": ping\n\n", b":\n\n", b": ping\r\n\r\n") == []


def test_done_marker_is_an_ordinary_event() -> None:
    """data: [DONE] is framed like any other event; giving it meaning is events.py's job."""
    assert _decode(b"data: [DONE]\n\n") == [("message", "[DONE]", "", None)]


def test_final_event_ended_by_close_after_blank_line() -> None:
    """A stream whose last bytes are an event and its blank line yields that event."""
    decoder = SSEStreamDecoder()
    assert decoder.feed(b"data: x\n") == []
    assert [_tuple(e) for e in decoder.feed(b"\n")] == [("message", "x", "", None)]
    assert decoder.close() == []


def test_trailing_cr_at_close_ends_the_last_line() -> None:
    """A CR held back to see whether LF follows still ends the line when the stream ends."""
    assert _decode(b"data: x\r\r") == [("message", "x", "", None)]


# --- a Vapi stream, cut at every byte --------------------------------------------------------

VAPI_EVENTS = [
    {"id": "chat_1", "sessionId": "s_1", "path": "chat.output[0].content", "delta": "Bon"},
    {"id": "chat_1", "sessionId": "s_1", "path": "chat.output[0].content", "delta": "jour, ☃ "},
    {"id": "chat_1", "sessionId": "s_1", "path": "chat.output[0].content", "delta": "😀 ça va?"},
]
VAPI_BODY = (
    b": keep-alive\n\n"
    + b"".join(
        b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in VAPI_EVENTS
    )
    + b"event: message\r\nid: 7\r\ndata: [DONE]\r\n\r\n"
)
VAPI_EXPECTED: list[Event] = [
    *(("message", json.dumps(e, ensure_ascii=False), "", None) for e in VAPI_EVENTS),
    ("message", "[DONE]", "7", None),
]


def test_vapi_stream_in_one_chunk() -> None:
    """A whole Vapi stream in one chunk gives its events, matching httpx-sse's own reading."""
    assert _decode(VAPI_BODY) == VAPI_EXPECTED
    assert _reference(VAPI_BODY) == VAPI_EXPECTED


def test_vapi_stream_split_at_every_byte_position() -> None:
    """Cutting the stream into two chunks at any byte gives the same events."""
    for chunks in _split_everywhere(VAPI_BODY):
        assert _decode(*chunks) == VAPI_EXPECTED, chunks


def test_vapi_stream_one_byte_at_a_time() -> None:
    """Feeding one byte per chunk gives the same events."""
    assert _decode(*(VAPI_BODY[i : i + 1] for i in range(len(VAPI_BODY)))) == VAPI_EXPECTED


@pytest.mark.parametrize("char", ["é", "☃", "😀"], ids=["2-byte", "3-byte", "4-byte"])
def test_multibyte_character_split_between_chunks(char: str) -> None:
    """A UTF-8 character whose bytes arrive in different chunks decodes whole."""
    encoded = char.encode()
    for cut in range(1, len(encoded)):
        body = b"data: " + encoded[:cut], encoded[cut:] + b"\n\n"
        assert _decode(*body) == [("message", char, "", None)]


def test_leading_byte_order_mark_is_dropped_even_when_split() -> None:
    """A BOM at the start of the stream is ignored, also when its bytes arrive apart."""
    assert _decode(b"\xef", b"\xbb", b"\xbfdata: x\n\n") == [("message", "x", "", None)]


# --- errors ----------------------------------------------------------------------------------


def test_invalid_utf8_is_a_protocol_error() -> None:
    """Bytes that are not UTF-8 raise VapiProtocolError rather than being replaced."""
    decoder = SSEStreamDecoder()
    with pytest.raises(VapiProtocolError, match="not valid UTF-8"):
        decoder.feed(b"data: \xff\n\n")


def test_events_before_invalid_utf8_in_the_same_chunk_come_first() -> None:
    """Events completed before the bad bytes are returned; the next call raises."""
    decoder = SSEStreamDecoder()
    events = decoder.feed(b"data: a\n\ndata: b\n\ndata: \xff\n\n")
    assert [e.data for e in events] == ["a", "b"]
    with pytest.raises(VapiProtocolError, match="not valid UTF-8"):
        decoder.feed(b"data: c\n\n")
    with pytest.raises(VapiProtocolError, match="not valid UTF-8"):
        decoder.close()


def test_invalid_utf8_after_a_split_character_keeps_the_character() -> None:
    """A character completed by the chunk that then turns bad is part of the good prefix."""
    decoder = SSEStreamDecoder()
    assert decoder.feed(b"data: \xe2\x98") == []
    events = decoder.feed(b"\x83\n\n\xff")
    assert [e.data for e in events] == ["\u2603"]
    with pytest.raises(VapiProtocolError):
        decoder.close()


def test_stream_ending_inside_a_character_is_a_protocol_error() -> None:
    """A stream that stops in the middle of a multi-byte character fails at close."""
    decoder = SSEStreamDecoder()
    decoder.feed(b"data: \xe2\x98")
    with pytest.raises(VapiProtocolError, match="inside a UTF-8 character"):
        decoder.close()


def test_unterminated_line_is_bounded() -> None:
    """A line that never ends raises once it exceeds the bound, whatever the chunk size."""
    decoder = SSEStreamDecoder(max_event_chars=1000)
    decoder.feed(b"data: " + b"x" * 894)
    decoder.feed(b"x" * 100)
    with pytest.raises(VapiProtocolError, match="exceeds 1000"):
        decoder.feed(b"x")


def test_unterminated_event_is_bounded() -> None:
    """Many data lines without the blank line that ends the event raise once over the bound."""
    decoder = SSEStreamDecoder(max_event_chars=1000)
    for _ in range(125):  # 8 characters each: exactly at the bound
        decoder.feed(b"data: xx\n")
    with pytest.raises(VapiProtocolError, match="exceeds 1000"):
        decoder.feed(b"data: xx\n")


def test_many_small_events_stay_within_the_bound() -> None:
    """The bound is per event: a long stream of small events never trips it."""
    decoder = SSEStreamDecoder(max_event_chars=100)
    count = sum(len(decoder.feed(b": ping\ndata: 0123456789\n\n")) for _ in range(1000))
    assert count == 1000


# --- property: any chunking of a valid stream gives the same events --------------------------

_text = st.text(
    st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=12
)
_line = st.one_of(
    _text.map(lambda t: f"data: {t}"),
    _text.map(lambda t: f"data:{t}"),
    st.just("data"),
    _text.map(lambda t: f": {t}"),
    st.sampled_from(["event: delta", "id: 42", "id", "retry: 3000", "retry: x", "other: y"]),
    st.just(""),
)


@st.composite
def _streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(_line, max_size=25))
    # One ending per stream: mixing a CR ending with a following empty LF line would read as CRLF.
    eol = draw(st.sampled_from(["\n", "\r", "\r\n"]))
    return "".join(line + eol for line in lines).encode()


@st.composite
def _chunkings(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    body = draw(_streams())
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=12)))
    edges = [0, *cuts, len(body)]
    return body, [body[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=300, deadline=None)
@given(_chunkings())
def test_any_chunking_gives_the_same_events(case: tuple[bytes, list[bytes]]) -> None:
    """However a valid stream is cut into chunks, its events equal httpx-sse's one-piece reading."""
    body, chunks = case
    assert _decode(*chunks) == _decode(body) == _reference(body)
