"""The messages on the worker's topics, and the one place their JSON is validated.

Three messages, each with a JSON Schema 2020-12 file in ``schemas/`` that documents it for other
teams (``tests/unit/test_schemas.py`` keeps models and files from drifting):

    ChatRequest   chat.request.v1    chat.requests   (input; decoded with ``decode_request``)
    ChatDelta     chat.delta.v1      chat.deltas     (output; one per streamed text fragment)
    ChatResponse  chat.response.v1   chat.responses  (output; exactly one per request)

Validation is strict (``"true"`` is not a boolean, ``"1"`` is not a number), so the models accept
exactly what the schema files accept. Unknown fields are ignored rather than rejected, on every
message: producers and consumers evolve at different times, and v1 only ever grows by optional
fields. A breaking change gets a new schema name (``chat.request.v2``), which this worker refuses
with ``unknown_schema``.

``decode_request`` never raises anything but ``InvalidRequestError`` whose ``reason`` is one of
``INVALID_REASONS``: the caller routes every such record to the dead-letter topic with that reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Annotated, Any, ClassVar, Final, Literal, Self, get_args

import pydantic_core
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from worker.errors import InvalidRequestError

REQUEST_SCHEMA: Final = "chat.request.v1"
DELTA_SCHEMA: Final = "chat.delta.v1"
RESPONSE_SCHEMA: Final = "chat.response.v1"

#: Every ``InvalidRequestError.reason`` that ``decode_request`` can raise (the DLQ reason codes).
InvalidReason = Literal[
    "empty",
    "not_utf8",
    "not_json",
    "not_object",
    "unknown_schema",
    "missing_field",
    "invalid_field",
    "empty_conversation_id",
    "missing_key",
    "key_mismatch",
    "input_too_large",
    "metadata_too_large",
]
INVALID_REASONS: Final[frozenset[str]] = frozenset(get_args(InvalidReason))

#: Longest ``detail`` text; details name the field and the rule, never echo the whole record.
MAX_DETAIL_CHARS: Final = 200
MAX_ID_CHARS: Final = 200

#: Incoming headers echoed on every output: W3C trace context, B3 (both forms) and the request id.
TRACE_HEADER_NAMES: Final[frozenset[str]] = frozenset(
    {"traceparent", "tracestate", "x-request-id", "b3"}
)
TRACE_HEADER_PREFIXES: Final[tuple[str, ...]] = ("x-b3-",)
DLQ_HEADER_PREFIX: Final = "dlq-"

#: Kafka record headers as the worker writes them on its outputs: (name, value) pairs.
Headers = Sequence[tuple[str, bytes]]
#: Kafka record headers as a record may carry them: a value can be null.
RecordHeaders = Sequence[tuple[str, bytes | None]]

_CONTENT_TYPE_HEADER: Final = ("content-type", b"application/json")

# Strict: the JSON Schema files say "boolean"/"integer"/"string", and lax coercion ("1" → 1) would
# make the model accept what the schema rejects. No NaN/Infinity: they are not JSON.
_MODEL_CONFIG: Final = ConfigDict(
    strict=True,
    extra="ignore",
    allow_inf_nan=False,
    frozen=True,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
)

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]

#: RFC 3339 date-time with an offset (``Z`` or ``±hh:mm``); the schema file has the same pattern.
RFC3339_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_RFC3339: Final = re.compile(RFC3339_PATTERN)


def _rfc3339(value: object) -> object:
    """An RFC 3339 string as an aware datetime; a datetime (a Python caller's) as it is."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-11-30T09:00:00Z")
    try:
        return datetime.fromisoformat(value.upper())
    except ValueError:
        raise ValueError(f"{value[:40]!r} is not a date-time that exists") from None


Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
NonNegativeMs = Annotated[float, Field(ge=0)]


class VapiMessage(BaseModel):
    """One message of a conversation, in Vapi's ``{role, content}`` shape."""

    model_config = _MODEL_CONFIG

    role: Literal["system", "user", "assistant", "tool"]
    content: str


def _input_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "messages"
    return None


# A callable discriminator instead of a plain union: a bad list element is then reported once, as
# ``input[0].role``, instead of also as "input is not a string" from the other branch.
ChatInput = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[VapiMessage], Field(min_length=1), Tag("messages")],
    Discriminator(
        _input_kind,
        custom_error_type="input_type",
        custom_error_message="must be a string or a non-empty array of {role, content} messages",
    ),
]


class ChatRequest(BaseModel):
    """A request to run one chat turn (``chat.request.v1``, topic ``chat.requests``)."""

    model_config = _MODEL_CONFIG
    SCHEMA: ClassVar[str] = REQUEST_SCHEMA

    request_id: Id
    conversation_id: Id
    input: ChatInput
    assistant_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = None
    assistant_overrides: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    reset_context: bool = False
    #: Past this moment the request is not started (``status: "expired"``, no Vapi call).
    expires_at: Rfc3339 | None = None
    # Optional on the wire (absent means v1); always written by ``encode``.
    schema_: Literal["chat.request.v1"] = Field(default=REQUEST_SCHEMA, alias="schema")

    def input_chars(self) -> int:
        """Characters of input text, summed over messages: what ``max_input_chars`` limits."""
        if isinstance(self.input, str):
            return len(self.input)
        return sum(len(message.content) for message in self.input)

    def encode(self) -> bytes:
        """Compact UTF-8 JSON, as a producer would send it (unset optional fields left out)."""
        return self.model_dump_json(exclude_none=True).encode()


class ChatDelta(BaseModel):
    """One fragment of reply text, published as it arrives (``chat.delta.v1``).

    Consumers drop duplicates by ``(request_id, attempt, chat_id, seq)``. One stream is one
    ``(request_id, attempt, chat_id)``: a new ``attempt`` (a retry, seq from 0 again) or a new
    ``chat_id`` (the request run again after a crash or rebalance, attempts from 1 again) means
    the stream restarted, and the earlier stream's text is void (docs/design.md §2.2).
    """

    model_config = _MODEL_CONFIG
    SCHEMA: ClassVar[str] = DELTA_SCHEMA

    request_id: Id
    conversation_id: Id
    chat_id: Annotated[str, Field(min_length=1)]
    attempt: Annotated[int, Field(ge=1)]
    seq: Annotated[int, Field(ge=0)]
    delta: str
    ts: Annotated[float, Field(ge=0)]

    def encode(self) -> bytes:
        """Compact UTF-8 JSON; runs once per delta, so it calls the compiled serializer directly."""
        return _DELTA_SERIALIZER.to_json(self)


class ErrorInfo(BaseModel):
    """Why a request failed: a stable ``code``, a human message, and whether a retry might help."""

    model_config = _MODEL_CONFIG

    code: Annotated[str, Field(min_length=1)]
    message: str
    retryable: bool
    http_status: Annotated[int, Field(ge=100, le=599)] | None


class Timings(BaseModel):
    """Where the time went, in milliseconds."""

    model_config = _MODEL_CONFIG

    queued_ms: NonNegativeMs
    first_delta_ms: NonNegativeMs | None
    total_ms: NonNegativeMs


class Cost(BaseModel):
    """What Vapi billed for a reply: the chat's ``cost`` in USD and its model tokens."""

    model_config = _MODEL_CONFIG

    usd: Annotated[float, Field(ge=0)]
    prompt_tokens: Annotated[int, Field(ge=0)]
    completion_tokens: Annotated[int, Field(ge=0)]


class ChatResponse(BaseModel):
    """The outcome of one request, exactly one per ``request_id`` (``chat.response.v1``).

    ``expired``: the request was not run (no Vapi call), it was too old (``expires_at`` or
    ``WORKER_REQUEST_MAX_AGE_S``); ``error`` says which. ``cost`` and ``stream_complete`` are
    set on a completed response whose chat was fetched (``VAPI_FETCH_CHAT``), null otherwise;
    ``stream_complete`` false means the stream ended before the reply did and ``text`` is
    Vapi's whole reply, not the deltas.
    """

    model_config = _MODEL_CONFIG
    SCHEMA: ClassVar[str] = RESPONSE_SCHEMA

    request_id: Id
    conversation_id: Id
    chat_id: Annotated[str, Field(min_length=1)] | None
    previous_chat_id: Annotated[str, Field(min_length=1)] | None
    status: Literal["completed", "failed", "expired"]
    text: str
    delta_count: Annotated[int, Field(ge=0)]
    # 0 when the request failed before Vapi was called (a 429 pause past its deadline, a bug).
    attempts: Annotated[int, Field(ge=0)]
    context_reset: bool
    error: ErrorInfo | None
    timings: Timings
    metadata: dict[str, Any] | None
    cost: Cost | None = None
    stream_complete: bool | None = None

    @model_validator(mode="after")
    def _error_matches_status(self) -> Self:
        if self.status != "completed" and self.error is None:
            raise ValueError(f"error is required when status is {self.status!r}")
        if self.status == "completed" and self.error is not None:
            raise ValueError("error must be null when status is 'completed'")
        return self

    def encode(self) -> bytes:
        """Compact UTF-8 JSON."""
        return self.model_dump_json().encode()


_DELTA_SERIALIZER: Final = ChatDelta.__pydantic_serializer__


# --- decoding -------------------------------------------------------------------------------------


def decode_request(
    value: bytes | None,
    key: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] = (),
    *,
    max_input_chars: int,
    max_metadata_bytes: int,
) -> ChatRequest:
    """Decode and validate one record from the request topic.

    Checks run in this order, and the first failure decides the reason: empty, not_utf8,
    not_json (also: NaN, unpaired surrogate escapes, nesting deeper than 200), not_object,
    unknown_schema (body field or ``schema`` header), missing_field, empty_conversation_id,
    invalid_field, missing_key (a null key), key_mismatch (a key, even an empty one, that is not
    the UTF-8 of ``conversation_id``), input_too_large, metadata_too_large. Raises
    ``InvalidRequestError`` and nothing else, whatever the bytes.

    The key must be the conversation_id: it decides the partition, and so which worker runs the
    turn and which changelog partition holds the conversation's state. A turn on another
    partition would run beside the conversation's other turns, on state they have not written yet.
    """
    document = _parse_object(value)
    _check_schema(document, headers)
    request = _validate(document)
    _check_key(request, key)
    _check_sizes(request, max_input_chars=max_input_chars, max_metadata_bytes=max_metadata_bytes)
    return request


def _parse_object(value: bytes | None) -> dict[str, Any]:
    if not value:
        raise InvalidRequestError("empty", detail="the record has no value")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError("not_utf8", detail=f"invalid UTF-8 at byte {exc.start}") from None
    try:
        # pydantic-core's parser, not json.loads: it rejects NaN and unpaired surrogates (which
        # could not be re-encoded as UTF-8 later) and bounds nesting depth (no RecursionError).
        document = pydantic_core.from_json(text, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidRequestError("not_json", detail=_truncate(str(exc))) from None
    if not isinstance(document, dict):
        raise InvalidRequestError(
            "not_object", detail=f"the JSON value is {_json_type(document)}, not an object"
        )
    return document


def _check_schema(document: dict[str, Any], headers: Iterable[tuple[str, bytes | None]]) -> None:
    named = document.get("schema", REQUEST_SCHEMA)
    if named != REQUEST_SCHEMA:
        raise InvalidRequestError(
            "unknown_schema",
            detail=f"field 'schema' is {_truncate(repr(named), 60)}, expected {REQUEST_SCHEMA!r}",
        )
    for name, header in headers:
        if name.lower() != "schema" or header is None:
            continue
        if header != REQUEST_SCHEMA.encode():
            shown = _truncate(repr(header.decode("utf-8", "replace")), 60)
            raise InvalidRequestError(
                "unknown_schema", detail=f"header 'schema' is {shown}, expected {REQUEST_SCHEMA!r}"
            )


def _validate(document: dict[str, Any]) -> ChatRequest:
    try:
        return ChatRequest.model_validate(document)
    except ValidationError as exc:
        raise _invalid_from(exc) from None


def _invalid_from(exc: ValidationError) -> InvalidRequestError:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    missing = [error for error in errors if error["type"] == "missing"]
    if missing:
        names = ", ".join(_field_path(error["loc"]) for error in missing)
        return InvalidRequestError("missing_field", detail=f"required field missing: {names}")
    first = errors[0]
    where = _field_path(first["loc"])
    if where == "conversation_id" and first["type"] == "string_too_short":
        return InvalidRequestError("empty_conversation_id", detail="conversation_id is empty")
    message = first["msg"].removeprefix("Value error, ")
    detail = f"{where}: {message}" if where else message
    return InvalidRequestError("invalid_field", detail=_truncate(detail))


def _check_key(request: ChatRequest, key: bytes | None) -> None:
    if key is None:
        raise InvalidRequestError(
            "missing_key", detail="the record has no key; it must be the conversation_id"
        )
    try:
        decoded = key.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("key_mismatch", detail="the record key is not UTF-8") from None
    if decoded != request.conversation_id:
        shown_key = _truncate(repr(decoded), 80)
        shown_id = _truncate(repr(request.conversation_id), 80)
        raise InvalidRequestError(
            "key_mismatch", detail=f"record key {shown_key} is not the conversation_id {shown_id}"
        )


def _check_sizes(request: ChatRequest, *, max_input_chars: int, max_metadata_bytes: int) -> None:
    chars = request.input_chars()
    if chars > max_input_chars:
        raise InvalidRequestError(
            "input_too_large", detail=f"input has {chars} characters, limit {max_input_chars}"
        )
    if request.metadata is not None:
        size = len(pydantic_core.to_json(request.metadata))
        if size > max_metadata_bytes:
            raise InvalidRequestError(
                "metadata_too_large",
                detail=f"metadata is {size} bytes as JSON, limit {max_metadata_bytes}",
            )


# The discriminated union puts its tag ("text"/"messages") in error locations; readers want fields.
_UNION_TAGS: Final = frozenset({"text", "messages"})


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for position, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif position == 1 and loc[0] == "input" and part in _UNION_TAGS:
            continue
        else:
            path += f".{part}" if path else part
    return path


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def _truncate(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- Kafka headers --------------------------------------------------------------------------------


def output_headers(
    schema: str, trace_headers: Iterable[tuple[str, bytes | None]] = ()
) -> list[tuple[str, bytes]]:
    """Headers for an output record: content type, schema name, and the request's trace headers.

    Only allowlisted trace headers are echoed (``TRACE_HEADER_NAMES``, ``x-b3-*``), under their
    lower-cased names, in their original order; a header with a null value is dropped.
    """
    headers = [_CONTENT_TYPE_HEADER, ("schema", schema.encode())]
    for name, value in trace_headers:
        if value is None:
            continue
        lowered = name.lower()
        if lowered in TRACE_HEADER_NAMES or lowered.startswith(TRACE_HEADER_PREFIXES):
            headers.append((lowered, value))
    return headers


def dead_letter_headers(
    original_headers: Iterable[tuple[str, bytes | None]],
    *,
    reason: str,
    detail: str | None,
    topic: str,
    partition: int,
    offset: int,
) -> list[tuple[str, bytes | None]]:
    """The original record's headers plus where it came from and why it was dead-lettered.

    ``dlq-*`` headers already on the record (one dead-lettered before, then replayed) are replaced,
    so each ``dlq-*`` name appears once and describes this failure.
    """
    kept = [
        (name, value)
        for name, value in original_headers
        if not name.lower().startswith(DLQ_HEADER_PREFIX)
    ]
    return [
        *kept,
        ("dlq-reason", reason.encode()),
        ("dlq-detail", _truncate(detail or "").encode()),
        ("dlq-source-topic", topic.encode()),
        ("dlq-source-partition", str(partition).encode()),
        ("dlq-source-offset", str(offset).encode()),
    ]
