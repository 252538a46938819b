"""Unit tests for ``worker.limits``: splitting delta text and fitting dead letters to a record."""

from __future__ import annotations

import pydantic_core
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from hypothesis import given
from hypothesis import strategies as st

from worker.config import Settings
from worker.limits import (
    DLQ_HEADERS_DROPPED_HEADER,
    DLQ_TRUNCATED_HEADER,
    MAX_DELTA_TEXT_BYTES,
    SAFE_DELTA_CHARS,
    fit_dead_letter,
    json_text_bytes,
    record_bytes,
    split_text,
)
from worker.messages import ChatDelta, ChatResponse, RecordHeaders, Timings, output_headers

pytestmark = pytest.mark.unit

#: Every code point a Python str from JSON can hold: no lone surrogates (JSON parsers refuse them).
TEXT = st.text(st.characters(exclude_categories=("Cs",)))


@given(TEXT)
def test_json_text_bytes_is_the_serialized_size(text: str) -> None:
    """The measure is what the delta's JSON spends on the text, quotes excluded."""
    assert json_text_bytes(text) == len(pydantic_core.to_json(text)) - 2


@given(TEXT, st.integers(min_value=6, max_value=400))
def test_pieces_join_to_the_text_and_each_fits(text: str, max_bytes: int) -> None:
    """No character lost, none cut; every piece's JSON is within the bound."""
    pieces = split_text(text, max_bytes)
    assert "".join(pieces) == text
    assert all(json_text_bytes(piece) <= max_bytes for piece in pieces)
    # Each piece is whole code points: it encodes on its own (a cut character would not).
    assert all(piece.encode("utf-8").decode("utf-8") == piece for piece in pieces)
    assert all(pieces) or pieces == [""]


@given(TEXT, st.integers(min_value=6, max_value=400))
def test_text_that_fits_stays_one_piece(text: str, max_bytes: int) -> None:
    """Only text over the bound is split."""
    pieces = split_text(text, max_bytes)
    assert (len(pieces) == 1) == (json_text_bytes(text) <= max_bytes)


def test_worst_case_characters_split_at_the_bound() -> None:
    """Control characters (6 bytes as ``\\u0001``) and 4-byte emoji stay within the bound."""
    for char in ("\x01", "\U0001f600", "\u20ac", '"'):
        text = char * (3 * SAFE_DELTA_CHARS + 7)
        pieces = split_text(text, MAX_DELTA_TEXT_BYTES)
        assert len(pieces) > 1
        assert "".join(pieces) == text
        assert all(json_text_bytes(piece) <= MAX_DELTA_TEXT_BYTES for piece in pieces)


def test_short_text_is_never_measured_too_large() -> None:
    """Text of at most SAFE_DELTA_CHARS characters always fits: the handler's fast path."""
    assert json_text_bytes("\x01" * SAFE_DELTA_CHARS) <= MAX_DELTA_TEXT_BYTES


def test_a_bound_below_one_character_is_refused() -> None:
    """Six bytes hold any one character; less cannot make progress."""
    with pytest.raises(ValueError, match="one character"):
        split_text("abc", 5)


def test_split_deltas_are_records_the_producer_takes() -> None:
    """A 1 MiB event of euro signs, split, gives deltas far below the producer's limit."""
    text = "\u20ac" * 1_048_576
    pieces = split_text(text, MAX_DELTA_TEXT_BYTES)
    delta = ChatDelta(
        request_id="r" * 200,
        conversation_id="c" * 200,
        chat_id="chat-1",
        attempt=1,
        seq=0,
        delta=pieces[0],
        ts=1.0,
    )
    assert record_bytes(b"c" * 200, delta.encode(), []) < 100_000


def test_the_default_reply_limit_fits_a_record_whatever_the_characters() -> None:
    """The default MAX_REPLY_CHARS keeps a response within the producer's 1,000,000 bytes.

    Control characters (6 bytes each as JSON), the largest default metadata and the longest ids.
    """
    settings = Settings()
    response = ChatResponse(
        request_id="r" * 200,
        conversation_id="c" * 200,
        chat_id="chat-1",
        previous_chat_id="chat-0",
        status="completed",
        text="\x01" * settings.max_reply_chars,
        delta_count=1,
        attempts=1,
        context_reset=False,
        error=None,
        timings=Timings(queued_ms=1.0, first_delta_ms=1.0, total_ms=1.0),
        metadata={"blob": "m" * (settings.max_metadata_bytes - 11)},
    )
    headers = output_headers(ChatResponse.SCHEMA, [("traceparent", b"0" * 55)])
    assert record_bytes(b"c" * 200, response.encode(), headers) <= 1_000_000


# --- dead letters ---------------------------------------------------------------------------------

SOURCE_HEADERS: RecordHeaders = [("x-case", b"big"), ("dlq-reason", b"not_json")]


def test_a_dead_letter_that_fits_is_unchanged() -> None:
    """Within the limit: same key, value and headers, no truncation header."""
    fitted = fit_dead_letter(b"k", b"v" * 100, SOURCE_HEADERS, max_bytes=1000)
    assert fitted == (b"k", b"v" * 100, SOURCE_HEADERS)


def test_a_too_large_value_is_cut_and_its_size_recorded() -> None:
    """Over the limit: the value's leading bytes, every header kept, ``dlq-truncated`` added."""
    value = b"v" * 5000
    key, cut, headers = fit_dead_letter(b"k", value, SOURCE_HEADERS, max_bytes=1000)
    assert key == b"k"
    assert value.startswith(cut)
    assert 0 < len(cut) < 1000
    assert headers == [*SOURCE_HEADERS, (DLQ_TRUNCATED_HEADER, b"5000")]
    assert record_bytes(key, cut, headers) <= 1000


def test_the_size_check_is_the_producers() -> None:
    """``record_bytes`` is the estimate aiokafka's ``send`` compares with max_request_size."""
    headers: RecordHeaders = [("a", b"b"), ("n", None)]
    expected = DefaultRecordBatchBuilder.estimate_size_in_bytes(b"key", b"value", headers)
    assert record_bytes(b"key", b"value", headers) == expected


HEADERS = st.lists(
    st.tuples(
        st.text(max_size=30).filter(lambda name: not name.lower().startswith("dlq-")),
        st.one_of(st.none(), st.binary(max_size=300)),
    ),
    max_size=6,
)
#: What ``dead_letter_headers`` adds (at most): these always stay.
ADDED: RecordHeaders = [("dlq-reason", b"not_json"), ("dlq-detail", b"d" * 60)]


@given(
    st.one_of(st.none(), st.binary(max_size=3000)),
    st.one_of(st.none(), st.binary(max_size=5000)),
    HEADERS,
    st.integers(min_value=400, max_value=4000),
)
def test_every_dead_letter_fits(
    key: bytes | None, value: bytes | None, headers: RecordHeaders, max_bytes: int
) -> None:
    """Whatever the record, the result fits: value cut first, then headers, then the key."""
    headers = [*headers, *ADDED]
    fitted_key, fitted_value, fitted_headers = fit_dead_letter(
        key, value, headers, max_bytes=max_bytes
    )
    assert record_bytes(fitted_key, fitted_value, fitted_headers) <= max_bytes
    if record_bytes(key, value, headers) <= max_bytes:
        assert (fitted_key, fitted_value, fitted_headers) == (key, value, headers)
        return
    marks = dict(fitted_headers)
    assert marks[DLQ_TRUNCATED_HEADER] == str(len(value or b"")).encode()
    assert (value or b"").startswith(fitted_value or b"")
    assert all(added in fitted_headers for added in ADDED)
    if fitted_headers[: len(headers)] != headers:
        # Originals dropped only once the value is gone, and said so.
        assert fitted_value in (b"", None)
        assert marks[DLQ_HEADERS_DROPPED_HEADER] == str(len(headers) - len(ADDED)).encode()
    if fitted_key != key:
        assert key is not None
        assert fitted_key is not None
        assert key.startswith(fitted_key)
        assert fitted_value in (b"", None)
