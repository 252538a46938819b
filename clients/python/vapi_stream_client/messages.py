"""The messages on the worker's topics: the pydantic models of the four contracts.

Four messages, each with a JSON Schema 2020-12 file in the repository's ``schemas/`` that
documents it for other teams (the worker's tests keep models and files from drifting):

    ChatRequest   chat.request.v1    chat.requests   (what a producer sends)
    ChatCancel    chat.cancel.v1     chat.requests   (cancels requests of one conversation)
    ChatDelta     chat.delta.v1      chat.deltas     (one per streamed text fragment)
    ChatResponse  chat.response.v1   chat.responses  (exactly one per request, in normal operation)

Validation is strict (``"true"`` is not a boolean, ``"1"`` is not a number), so the models accept
exactly what the schema files accept. Unknown fields are ignored rather than rejected, on every
message: producers and consumers evolve at different times, and v1 only ever grows by optional
fields. A breaking change gets a new schema name (``chat.request.v2``).

This module imports pydantic only: the worker (``worker.messages``) and the client share it.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

REQUEST_SCHEMA: Final = "chat.request.v1"
DELTA_SCHEMA: Final = "chat.delta.v1"
RESPONSE_SCHEMA: Final = "chat.response.v1"
CANCEL_SCHEMA: Final = "chat.cancel.v1"

MAX_ID_CHARS: Final = 200

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
    #: True: the conversation's earlier requests still queued or streaming are cancelled first.
    supersede: bool = False
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


class ChatCancel(BaseModel):
    """Cancels requests of one conversation (``chat.cancel.v1``, on the request topic).

    Keyed by ``conversation_id`` like a request. With ``request_id``: that request; without:
    every request of the conversation the worker took before the cancel. A cancelled request
    that is queued or streaming ends with one ``status: "cancelled"`` response; one already
    finished, or not yet taken, is not affected (docs/design.md §5.8).
    """

    model_config = _MODEL_CONFIG
    SCHEMA: ClassVar[str] = CANCEL_SCHEMA

    # Required on the wire: a record without ``schema`` is a chat.request.v1.
    schema_: Literal["chat.cancel.v1"] = Field(alias="schema")
    conversation_id: Id
    request_id: Id | None = None

    def encode(self) -> bytes:
        """Compact UTF-8 JSON (an absent ``request_id`` left out)."""
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
    ``WORKER_REQUEST_MAX_AGE_S``); ``error`` says which. ``cancelled``: a ``chat.cancel.v1`` or a
    superseding request ended it; ``text`` is what was streamed before (its deltas stay),
    ``chat_id`` the cut-off chat, which the conversation's next turn does not continue from.
    ``cost`` and ``stream_complete`` are set on a completed response whose chat was fetched
    (``VAPI_FETCH_CHAT``), null otherwise;
    ``stream_complete`` false means the stream ended before the reply did and ``text`` is
    Vapi's whole reply, not the deltas.
    """

    model_config = _MODEL_CONFIG
    SCHEMA: ClassVar[str] = RESPONSE_SCHEMA

    request_id: Id
    conversation_id: Id
    chat_id: Annotated[str, Field(min_length=1)] | None
    previous_chat_id: Annotated[str, Field(min_length=1)] | None
    status: Literal["completed", "failed", "expired", "cancelled"]
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


def request_headers(schema: str = REQUEST_SCHEMA) -> list[tuple[str, bytes]]:
    """The headers of a record on the request topic: its content type and schema name."""
    return [("content-type", b"application/json"), ("schema", schema.encode())]
