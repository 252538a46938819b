"""Message models, request decoding (with its DLQ reason codes) and Kafka header helpers."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from worker.errors import InvalidRequestError
from worker.messages import (
    INVALID_REASONS,
    MAX_DETAIL_CHARS,
    ChatCancel,
    ChatDelta,
    ChatRequest,
    ChatResponse,
    ErrorInfo,
    Timings,
    VapiMessage,
    dead_letter_headers,
    decode_record,
    decode_request,
    output_headers,
)

pytestmark = pytest.mark.unit

LIMITS: dict[str, int] = {"max_input_chars": 100, "max_metadata_bytes": 64}


#: The record key of ``_body()``'s conversation.
KEY = b"c-1"


def _decode(
    value: bytes | None,
    key: bytes | None = KEY,
    headers: list[tuple[str, bytes | None]] | None = None,
) -> ChatRequest:
    return decode_request(value, key, headers or [], **LIMITS)


def _body(**fields: Any) -> bytes:
    document: dict[str, Any] = {"request_id": "r-1", "conversation_id": "c-1", "input": "hi"}
    document.update(fields)
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


def _reason(
    value: bytes | None,
    key: bytes | None = KEY,
    headers: list[tuple[str, bytes | None]] | None = None,
) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        _decode(value, key, headers)
    return caught.value.reason


# --- decode_request: valid records -----------------------------------------------------------


def test_decodes_a_minimal_request_with_defaults() -> None:
    """A record with only the three required fields decodes, with documented defaults."""
    request = _decode(_body(), key=b"c-1")
    assert request.request_id == "r-1"
    assert request.conversation_id == "c-1"
    assert request.input == "hi"
    assert request.assistant_id is None
    assert request.assistant_overrides is None
    assert request.metadata is None
    assert request.reset_context is False


def test_decodes_message_list_input_and_optional_fields() -> None:
    """A message-array input and every optional field are read as given."""
    request = _decode(
        _body(
            input=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            assistant_id="a-1",
            assistant_overrides={"variableValues": {"name": "Ada"}},
            metadata={"ticket": 7},
            reset_context=True,
            schema="chat.request.v1",
        ),
        headers=[("schema", b"chat.request.v1")],
    )
    assert request.input == [
        VapiMessage(role="system", content="be brief"),
        VapiMessage(role="user", content="hi"),
    ]
    assert request.assistant_id == "a-1"
    assert request.assistant_overrides == {"variableValues": {"name": "Ada"}}
    assert request.metadata == {"ticket": 7}
    assert request.reset_context is True


def test_unknown_fields_are_ignored() -> None:
    """Fields this version does not know are ignored, so producers can evolve first."""
    request = _decode(_body(priority="high", input=[{"role": "user", "content": "x", "name": "n"}]))
    assert "priority" not in request.model_dump()


def test_a_record_without_a_key_is_refused() -> None:
    """A null key could put the conversation's turns on several partitions: missing_key."""
    with pytest.raises(InvalidRequestError) as caught:
        _decode(_body(), key=None)
    assert caught.value.reason == "missing_key"
    assert caught.value.detail == "the record has no key; it must be the conversation_id"


def test_a_key_of_another_conversation_is_refused() -> None:
    """A key that is not the conversation_id's UTF-8 is key_mismatch, and the detail shows it."""
    with pytest.raises(InvalidRequestError) as caught:
        _decode(_body(), key=b"c-2")
    assert caught.value.reason == "key_mismatch"
    assert caught.value.detail == "record key 'c-2' is not the conversation_id 'c-1'"


def test_limits_are_inclusive() -> None:
    """Input of exactly max_input_chars and metadata of exactly max_metadata_bytes are accepted."""
    metadata = {"k": "x" * (LIMITS["max_metadata_bytes"] - len('{"k":""}'))}
    request = _decode(_body(input="é" * LIMITS["max_input_chars"], metadata=metadata))
    assert request.input_chars() == LIMITS["max_input_chars"]


def test_encode_round_trips_through_decode() -> None:
    """A request encoded by the model decodes back to an equal model."""
    request = ChatRequest(
        request_id="r",
        conversation_id="c",
        input=[VapiMessage(role="user", content="héllo ☃")],
        metadata={"a": [1, 2.5, None, True]},
    )
    encoded = request.encode()
    assert json.loads(encoded)["schema"] == "chat.request.v1"
    assert _decode(encoded, key=b"c") == request


# --- decode_request: the reason codes --------------------------------------------------------

BAD_RECORDS: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes | None]], str]] = [
    ("null value", None, None, [], "empty"),
    ("empty value", b"", None, [], "empty"),
    ("latin-1 bytes", b'{"request_id": "\xe9"}', None, [], "not_utf8"),
    ("truncated JSON", b'{"request_id": ', None, [], "not_json"),
    ("NaN", b'{"request_id": NaN}', None, [], "not_json"),
    ("lone surrogate escape", b'{"request_id": "\\ud800"}', None, [], "not_json"),
    ("deep nesting", b"[" * 5000 + b"]" * 5000, None, [], "not_json"),
    ("array", b"[1, 2]", None, [], "not_object"),
    ("string", b'"hello"', None, [], "not_object"),
    ("null", b"null", None, [], "not_object"),
    ("v2 in body", _body(schema="chat.request.v2"), None, [], "unknown_schema"),
    ("null schema", _body(schema=None), None, [], "unknown_schema"),
    ("v2 in header", _body(), None, [("schema", b"chat.request.v2")], "unknown_schema"),
    ("header case", _body(), None, [("Schema", b"other")], "unknown_schema"),
    ("no request_id", _body(request_id=...), None, [], "missing_field"),
    ("no input", _body(input=...), None, [], "missing_field"),
    ("empty conversation", _body(conversation_id=""), None, [], "empty_conversation_id"),
    ("empty request_id", _body(request_id=""), None, [], "invalid_field"),
    ("long request_id", _body(request_id="r" * 201), None, [], "invalid_field"),
    ("numeric request_id", _body(request_id=5), None, [], "invalid_field"),
    ("numeric conversation", _body(conversation_id=5), None, [], "invalid_field"),
    ("input object", _body(input={"text": "hi"}), None, [], "invalid_field"),
    ("input empty list", _body(input=[]), None, [], "invalid_field"),
    ("bad role", _body(input=[{"role": "bot", "content": "x"}]), None, [], "invalid_field"),
    ("no content", _body(input=[{"role": "user"}]), None, [], "missing_field"),
    ("string bool", _body(reset_context="true"), None, [], "invalid_field"),
    ("metadata list", _body(metadata=[1]), None, [], "invalid_field"),
    ("empty assistant", _body(assistant_id=""), None, [], "invalid_field"),
    ("no key", _body(), None, [], "missing_key"),
    ("other key", _body(), b"c-2", [], "key_mismatch"),
    ("empty key", _body(), b"", [], "key_mismatch"),
    ("binary key", _body(), b"\xff\xfe", [], "key_mismatch"),
    ("long input", _body(input="x" * 101), KEY, [], "input_too_large"),
    (
        "long messages",
        _body(input=[{"role": "user", "content": "x" * 60}] * 2),
        KEY,
        [],
        "input_too_large",
    ),
    ("big metadata", _body(metadata={"k": "x" * 64}), KEY, [], "metadata_too_large"),
]


@pytest.mark.parametrize(
    ("value", "key", "headers", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_RECORDS],
)
def test_invalid_records_raise_their_reason(
    value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes | None]], reason: str
) -> None:
    """Each kind of bad record raises InvalidRequestError with its documented reason code."""
    assert _reason(value, key, headers) == reason


def test_every_reason_code_is_reachable() -> None:
    """The table above exercises every reason code the module declares."""
    assert {case[-1] for case in BAD_RECORDS} == INVALID_REASONS


def test_detail_names_the_field_in_plain_words() -> None:
    """The detail points at the offending field by its path."""
    with pytest.raises(InvalidRequestError) as caught:
        _decode(_body(input=[{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]))
    assert caught.value.detail is not None
    assert caught.value.detail.startswith("input[1].role: ")


def test_detail_does_not_echo_huge_values() -> None:
    """A detail stays short even when the offending value is huge."""
    with pytest.raises(InvalidRequestError) as caught:
        _decode(_body(schema="v" * 100_000))
    assert caught.value.detail is not None
    assert len(caught.value.detail) <= MAX_DETAIL_CHARS


def test_missing_fields_are_all_named() -> None:
    """When several required fields are missing, the detail lists them all."""
    with pytest.raises(InvalidRequestError) as caught:
        _decode(b"{}")
    assert caught.value.detail == ("required field missing: request_id, conversation_id, input")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_nothing_but_invalid_request(value: bytes) -> None:
    """Arbitrary bytes either decode or raise InvalidRequestError with a known reason."""
    reason = None
    try:
        _decode(value, key=value[:3] or None, headers=[("schema", value[:5])])
    except InvalidRequestError as exc:
        reason = exc.reason
    assert reason is None or reason in INVALID_REASONS


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
_field_names = st.sampled_from(
    [
        "request_id",
        "conversation_id",
        "input",
        "assistant_id",
        "assistant_overrides",
        "metadata",
        "reset_context",
        "schema",
        "role",
        "content",
    ]
)
_request_like = st.dictionaries(
    _field_names,
    _json_values
    | st.lists(st.fixed_dictionaries({"role": _json_values, "content": _json_values}), max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(_json_values, _request_like))
def test_random_json_raises_nothing_but_invalid_request(value: object) -> None:
    """Arbitrary JSON values, including request-shaped objects, never raise anything unexpected."""
    encoded = json.dumps(value, ensure_ascii=False).encode()
    try:
        request = _decode(encoded, key=b"c-1")
    except InvalidRequestError as exc:
        reason: str | None = exc.reason
    else:
        reason = None
        assert request.input_chars() <= LIMITS["max_input_chars"]
    assert reason is None or reason in INVALID_REASONS


# --- output models ---------------------------------------------------------------------------


def _delta(**fields: Any) -> ChatDelta:
    values: dict[str, Any] = {
        "request_id": "r-1",
        "conversation_id": "c-1",
        "chat_id": "chat-1",
        "attempt": 1,
        "seq": 0,
        "delta": "Hé ☃ 😀",
        "ts": 1732550400.25,
    }
    values.update(fields)
    return ChatDelta(**values)


def _response(**fields: Any) -> ChatResponse:
    values: dict[str, Any] = {
        "request_id": "r-1",
        "conversation_id": "c-1",
        "chat_id": "chat-2",
        "previous_chat_id": "chat-1",
        "status": "completed",
        "text": "hello",
        "delta_count": 2,
        "attempts": 1,
        "context_reset": False,
        "error": None,
        "timings": Timings(queued_ms=1.5, first_delta_ms=20, total_ms=90.25),
        "metadata": {"ticket": 7},
    }
    values.update(fields)
    return ChatResponse(**values)


def test_delta_encodes_to_compact_utf8_json() -> None:
    """ChatDelta.encode gives compact JSON with raw UTF-8 text, equal to the model's JSON dump."""
    delta = _delta()
    encoded = delta.encode()
    assert b" " not in encoded.replace("Hé ☃ 😀".encode(), b"")
    assert "Hé ☃ 😀".encode() in encoded
    assert json.loads(encoded) == delta.model_dump(mode="json")
    assert list(json.loads(encoded)) == [
        "request_id",
        "conversation_id",
        "chat_id",
        "attempt",
        "seq",
        "delta",
        "ts",
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"attempt": 0},
        {"seq": -1},
        {"ts": math.nan},
        {"ts": math.inf},
        {"chat_id": ""},
        {"attempt": "1"},
        {"attempt": True},
    ],
    ids=str,
)
def test_delta_rejects_values_the_schema_forbids(fields: dict[str, Any]) -> None:
    """Out-of-range, non-finite or mistyped delta fields are refused at construction."""
    with pytest.raises(ValidationError):
        _delta(**fields)


def test_response_round_trips_and_keeps_every_field() -> None:
    """ChatResponse.encode writes every field, nulls included, and parses back equal."""
    response = _response(
        status="failed",
        chat_id=None,
        metadata=None,
        error=ErrorInfo(code="vapi_timeout", message="stalled", retryable=True, http_status=None),
    )
    document = json.loads(response.encode())
    assert document["chat_id"] is None
    assert document["error"]["http_status"] is None
    assert ChatResponse.model_validate(document) == response


def test_failed_response_requires_an_error() -> None:
    """A failed response without an error is refused."""
    with pytest.raises(ValidationError, match="error is required"):
        _response(status="failed", error=None)


def test_completed_response_must_not_carry_an_error() -> None:
    """A completed response with an error is refused."""
    error = ErrorInfo(code="x", message="y", retryable=False, http_status=500)
    with pytest.raises(ValidationError, match="error must be null"):
        _response(error=error)


def test_each_model_names_its_schema() -> None:
    """Every message carries its schema name as a class constant."""
    assert ChatRequest.SCHEMA == "chat.request.v1"
    assert ChatDelta.SCHEMA == "chat.delta.v1"
    assert ChatResponse.SCHEMA == "chat.response.v1"


# --- headers ---------------------------------------------------------------------------------


def test_output_headers_echo_only_allowlisted_trace_headers() -> None:
    """Outputs carry content type, schema and allowlisted trace headers, lower-cased, in order."""
    incoming: list[tuple[str, bytes | None]] = [
        ("traceparent", b"00-abc-def-01"),
        ("Authorization", b"secret"),
        ("X-B3-TraceId", b"123"),
        ("schema", b"chat.request.v1"),
        ("tracestate", None),
        ("b3", b"1-2-1"),
        ("x-request-id", b"rid"),
        ("content-type", b"text/plain"),
        ("tracestate", b"k=v"),
    ]
    assert output_headers("chat.delta.v1", incoming) == [
        ("content-type", b"application/json"),
        ("schema", b"chat.delta.v1"),
        ("traceparent", b"00-abc-def-01"),
        ("x-b3-traceid", b"123"),
        ("b3", b"1-2-1"),
        ("x-request-id", b"rid"),
        ("tracestate", b"k=v"),
    ]


def test_output_headers_without_trace_headers() -> None:
    """With no incoming headers, only content type and schema are set."""
    assert output_headers("chat.response.v1") == [
        ("content-type", b"application/json"),
        ("schema", b"chat.response.v1"),
    ]


def test_dead_letter_headers_keep_originals_and_add_the_source() -> None:
    """DLQ headers are the original ones plus reason, detail and source coordinates."""
    original: list[tuple[str, bytes | None]] = [("traceparent", b"t"), ("x-null", None)]
    headers = dead_letter_headers(
        original, reason="not_json", detail="bad", topic="chat.requests", partition=3, offset=42
    )
    assert headers == [
        ("traceparent", b"t"),
        ("x-null", None),
        ("dlq-reason", b"not_json"),
        ("dlq-detail", b"bad"),
        ("dlq-source-topic", b"chat.requests"),
        ("dlq-source-partition", b"3"),
        ("dlq-source-offset", b"42"),
    ]


def test_dead_letter_headers_replace_earlier_dlq_headers() -> None:
    """A replayed record's old dlq-* headers are replaced, and a long detail is truncated."""
    original: list[tuple[str, bytes | None]] = [("DLQ-Reason", b"old"), ("dlq-detail", b"old")]
    headers = dict(
        dead_letter_headers(
            original, reason="empty", detail="x" * 1000, topic="t", partition=0, offset=0
        )
    )
    assert headers["dlq-reason"] == b"empty"
    assert "DLQ-Reason" not in headers
    detail = headers["dlq-detail"]
    assert detail is not None
    assert len(detail.decode()) == MAX_DETAIL_CHARS


# --- chat.cancel.v1 on the request topic ----------------------------------------------------------


def _decode_any(
    value: bytes, key: bytes | None, headers: list[tuple[str, bytes | None]] | None = None
) -> ChatRequest | ChatCancel:
    return decode_record(value, key, headers or [], max_input_chars=100, max_metadata_bytes=100)


def test_a_cancel_record_decodes_as_a_cancel() -> None:
    cancel = _decode_any(
        b'{"schema":"chat.cancel.v1","conversation_id":"c","request_id":"r"}', b"c"
    )
    assert isinstance(cancel, ChatCancel)
    assert (cancel.conversation_id, cancel.request_id) == ("c", "r")
    whole = _decode_any(b'{"schema":"chat.cancel.v1","conversation_id":"c"}', b"c")
    assert isinstance(whole, ChatCancel)
    assert whole.request_id is None


@pytest.mark.parametrize(
    ("value", "key", "headers", "reason"),
    [
        (b'{"schema":"chat.cancel.v1","conversation_id":"c"}', b"other", [], "key_mismatch"),
        (b'{"schema":"chat.cancel.v1","conversation_id":"c"}', None, [], "missing_key"),
        (b'{"schema":"chat.cancel.v1"}', b"c", [], "missing_field"),
        (b'{"schema":"chat.cancel.v1","conversation_id":""}', b"", [], "empty_conversation_id"),
        (
            b'{"schema":"chat.cancel.v1","conversation_id":"c","request_id":5}',
            b"c",
            [],
            "invalid_field",
        ),
        (b'{"schema":"chat.cancel.v2","conversation_id":"c"}', b"c", [], "unknown_schema"),
        # The header and the body name different schemas.
        (
            b'{"schema":"chat.cancel.v1","conversation_id":"c"}',
            b"c",
            [("schema", b"chat.request.v1")],
            "unknown_schema",
        ),
        # A cancel header on a body without its schema field: the field is required.
        (b'{"conversation_id":"c"}', b"c", [("schema", b"chat.cancel.v1")], "missing_field"),
    ],
)
def test_a_bad_cancel_is_a_dead_letter_with_its_reason(
    value: bytes, key: bytes | None, headers: list[tuple[str, bytes | None]], reason: str
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        _decode_any(value, key, headers)
    assert raised.value.reason == reason
    assert raised.value.reason in INVALID_REASONS


def test_decode_request_refuses_a_cancel() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        decode_request(
            b'{"schema":"chat.cancel.v1","conversation_id":"c"}',
            b"c",
            max_input_chars=100,
            max_metadata_bytes=100,
        )
    assert raised.value.reason == "unknown_schema"
