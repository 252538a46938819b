"""The messages on the worker's topics, and the one place their JSON is validated.

The models live in the client distribution (``vapi_stream_client.messages``, Faust-free, so a
producing service can install them alone) and are re-exported here. Four messages, each with a
JSON Schema 2020-12 file in ``schemas/`` that documents it for other teams
(``tests/unit/test_schemas.py`` keeps models and files from drifting):

    ChatRequest   chat.request.v1    chat.requests   (input; decoded with ``decode_record``)
    ChatCancel    chat.cancel.v1     chat.requests   (input; decoded with ``decode_record``)
    ChatDelta     chat.delta.v1      chat.deltas     (output; one per streamed text fragment)
    ChatResponse  chat.response.v1   chat.responses  (output; exactly one per request)

Validation is strict (``"true"`` is not a boolean, ``"1"`` is not a number), so the models accept
exactly what the schema files accept. Unknown fields are ignored rather than rejected, on every
message: producers and consumers evolve at different times, and v1 only ever grows by optional
fields. A breaking change gets a new schema name (``chat.request.v2``), which this worker refuses
with ``unknown_schema``.

``decode_record`` never raises anything but ``InvalidRequestError`` whose ``reason`` is one of
``INVALID_REASONS``: the caller routes every such record to the dead-letter topic with that reason.
A record of the request topic is a cancel when its ``schema`` (the body's field, else the
``schema`` header) is ``chat.cancel.v1``, and a request otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal, TypeVar, get_args

import pydantic_core
from pydantic import ValidationError

from vapi_stream_client.messages import CANCEL_SCHEMA as CANCEL_SCHEMA
from vapi_stream_client.messages import DELTA_SCHEMA as DELTA_SCHEMA
from vapi_stream_client.messages import MAX_ID_CHARS as MAX_ID_CHARS
from vapi_stream_client.messages import REQUEST_SCHEMA as REQUEST_SCHEMA
from vapi_stream_client.messages import RESPONSE_SCHEMA as RESPONSE_SCHEMA
from vapi_stream_client.messages import RFC3339_PATTERN as RFC3339_PATTERN
from vapi_stream_client.messages import ChatCancel as ChatCancel
from vapi_stream_client.messages import ChatDelta as ChatDelta
from vapi_stream_client.messages import ChatInput as ChatInput
from vapi_stream_client.messages import ChatRequest as ChatRequest
from vapi_stream_client.messages import ChatResponse as ChatResponse
from vapi_stream_client.messages import Cost as Cost
from vapi_stream_client.messages import ErrorInfo as ErrorInfo
from vapi_stream_client.messages import Timings as Timings
from vapi_stream_client.messages import VapiMessage as VapiMessage
from worker.errors import InvalidRequestError

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


# --- decoding -------------------------------------------------------------------------------------


def decode_record(
    value: bytes | None,
    key: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] = (),
    *,
    max_input_chars: int,
    max_metadata_bytes: int,
) -> ChatRequest | ChatCancel:
    """Decode and validate one record from the request topic: a request or a cancel.

    Checks run in this order, and the first failure decides the reason: empty, not_utf8,
    not_json (also: NaN, unpaired surrogate escapes, nesting deeper than 200), not_object,
    unknown_schema (a schema other than chat.request.v1 and chat.cancel.v1, or a ``schema``
    header that names another schema than the body), missing_field, empty_conversation_id,
    invalid_field, missing_key (a null key), key_mismatch (a key, even an empty one, that is not
    the UTF-8 of ``conversation_id``), then for a request input_too_large, metadata_too_large.
    Raises ``InvalidRequestError`` and nothing else, whatever the bytes.

    The key must be the conversation_id: it decides the partition, and so which worker runs the
    turn and which changelog partition holds the conversation's state. A turn on another
    partition would run beside the conversation's other turns, on state they have not written yet;
    a cancel on another partition would not find the requests it names.
    """
    document = _parse_object(value)
    if _schema_of(document, headers) == CANCEL_SCHEMA:
        cancel = _validate(ChatCancel, document)
        _check_key(cancel.conversation_id, key)
        return cancel
    request = _validate(ChatRequest, document)
    _check_key(request.conversation_id, key)
    _check_sizes(request, max_input_chars=max_input_chars, max_metadata_bytes=max_metadata_bytes)
    return request


def decode_request(
    value: bytes | None,
    key: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] = (),
    *,
    max_input_chars: int,
    max_metadata_bytes: int,
) -> ChatRequest:
    """``decode_record`` for a record that must be a request: a cancel is ``unknown_schema``."""
    decoded = decode_record(
        value,
        key,
        headers,
        max_input_chars=max_input_chars,
        max_metadata_bytes=max_metadata_bytes,
    )
    if not isinstance(decoded, ChatRequest):
        raise InvalidRequestError(
            "unknown_schema", detail=f"a {CANCEL_SCHEMA} record, expected {REQUEST_SCHEMA!r}"
        )
    return decoded


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


_INPUT_SCHEMAS: Final = (REQUEST_SCHEMA, CANCEL_SCHEMA)


def _schema_of(document: dict[str, Any], headers: Iterable[tuple[str, bytes | None]]) -> str:
    """The record's schema: the body's ``schema`` field, else its ``schema`` header, else a
    request. Body and header must agree, and name one of the request topic's two schemas."""
    named: object = document.get("schema")
    if "schema" in document and named not in _INPUT_SCHEMAS:
        raise InvalidRequestError(
            "unknown_schema",
            detail=f"field 'schema' is {_truncate(repr(named), 60)}, expected "
            f"{REQUEST_SCHEMA!r} or {CANCEL_SCHEMA!r}",
        )
    for name, header in headers:
        if name.lower() != "schema" or header is None:
            continue
        shown = _truncate(repr(header.decode("utf-8", "replace")), 60)
        if header not in (schema.encode() for schema in _INPUT_SCHEMAS):
            raise InvalidRequestError(
                "unknown_schema",
                detail=f"header 'schema' is {shown}, expected {REQUEST_SCHEMA!r} or "
                f"{CANCEL_SCHEMA!r}",
            )
        if named is not None and header != str(named).encode():
            raise InvalidRequestError(
                "unknown_schema", detail=f"header 'schema' is {shown}, field 'schema' is {named!r}"
            )
        named = header.decode()
    return REQUEST_SCHEMA if named is None else str(named)


_Input = TypeVar("_Input", ChatRequest, ChatCancel)


def _validate(model: type[_Input], document: dict[str, Any]) -> _Input:
    try:
        return model.model_validate(document)
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


def _check_key(conversation_id: str, key: bytes | None) -> None:
    if key is None:
        raise InvalidRequestError(
            "missing_key", detail="the record has no key; it must be the conversation_id"
        )
    try:
        decoded = key.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("key_mismatch", detail="the record key is not UTF-8") from None
    if decoded != conversation_id:
        shown_key = _truncate(repr(decoded), 80)
        shown_id = _truncate(repr(conversation_id), 80)
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
