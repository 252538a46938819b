"""The JSON Schema files in schemas/ and the pydantic models cannot drift apart.

Known, accepted divergence: JSON Schema counts 1.0 as an "integer" and the strict models do not, so
no sample here puts an integral float in an integer field (the worker never writes one).
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError

from vapi_stream_client import folding
from worker.errors import InvalidRequestError
from worker.messages import (
    RFC3339_PATTERN,
    ChatCancel,
    ChatDelta,
    ChatRequest,
    ChatResponse,
    Cost,
    ErrorInfo,
    Timings,
    VapiMessage,
    decode_record,
    decode_request,
)

pytestmark = pytest.mark.unit

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
MODELS: dict[str, type[BaseModel]] = {
    "chat.request.v1": ChatRequest,
    "chat.cancel.v1": ChatCancel,
    "chat.delta.v1": ChatDelta,
    "chat.response.v1": ChatResponse,
}


def _schema(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.json").read_text("utf-8"))
    return document


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(_schema(name))


def _model_accepts(model: type[BaseModel], document: object) -> bool:
    try:
        model.model_validate(document)
    except ValidationError:
        return False
    return True


def _fields(model: type[BaseModel]) -> dict[str, bool]:
    """Wire name → required, for every field of the model."""
    return {(info.alias or name): info.is_required() for name, info in model.model_fields.items()}


# --- valid samples, built through the models -------------------------------------------------

REQUESTS = [
    ChatRequest(request_id="r", conversation_id="c", input="hi"),
    ChatRequest(
        request_id="r" * 200,
        conversation_id="c",
        input=[VapiMessage(role="tool", content=""), VapiMessage(role="user", content="☃")],
        assistant_id="a",
        assistant_overrides={"variableValues": {"x": 1}},
        metadata={"nested": {"list": [1, 2.5, None]}},
        reset_context=True,
        expires_at=datetime(2026, 11, 30, 9, 30, tzinfo=timezone(timedelta(hours=-5))),
        supersede=True,
    ),
]
CANCELS = [
    ChatCancel.model_validate({"schema": "chat.cancel.v1", "conversation_id": "c"}),
    ChatCancel.model_validate(
        {"schema": "chat.cancel.v1", "conversation_id": "c" * 200, "request_id": "r" * 200}
    ),
]
DELTAS = [
    ChatDelta(request_id="r", conversation_id="c", chat_id="x", attempt=1, seq=0, delta="", ts=0),
    ChatDelta(
        request_id="r",
        conversation_id="c",
        chat_id="x",
        attempt=7,
        seq=12,
        delta="é😀",
        ts=1.7e9,
    ),
]
TIMINGS = Timings(queued_ms=0, first_delta_ms=None, total_ms=12.5)
RESPONSES = [
    ChatResponse(
        request_id="r",
        conversation_id="c",
        chat_id="x",
        previous_chat_id=None,
        status="completed",
        text="hello",
        delta_count=1,
        attempts=1,
        context_reset=True,
        error=None,
        timings=Timings(queued_ms=1, first_delta_ms=2.5, total_ms=3),
        metadata={"k": "v"},
    ),
    ChatResponse(
        request_id="r",
        conversation_id="c",
        chat_id=None,
        previous_chat_id="p",
        status="failed",
        text="",
        delta_count=0,
        attempts=0,
        context_reset=False,
        error=ErrorInfo(code="vapi_auth_error", message="no", retryable=False, http_status=401),
        timings=TIMINGS,
        metadata=None,
    ),
    ChatResponse(
        request_id="r",
        conversation_id="c",
        chat_id="x",
        previous_chat_id=None,
        status="completed",
        text="the whole reply",
        delta_count=1,
        attempts=1,
        context_reset=False,
        error=None,
        timings=TIMINGS,
        metadata=None,
        cost=Cost(usd=0.00042, prompt_tokens=90, completion_tokens=20),
        stream_complete=False,
    ),
    ChatResponse(
        request_id="r",
        conversation_id="c",
        chat_id=None,
        previous_chat_id=None,
        status="expired",
        text="",
        delta_count=0,
        attempts=0,
        context_reset=False,
        error=ErrorInfo(code="request_expired", message="old", retryable=False, http_status=None),
        timings=TIMINGS,
        metadata=None,
    ),
    ChatResponse(
        request_id="r",
        conversation_id="c",
        chat_id="x",
        previous_chat_id="p",
        status="cancelled",
        text="half a rep",
        delta_count=3,
        attempts=1,
        context_reset=False,
        error=ErrorInfo(code="cancelled", message="cancelled", retryable=False, http_status=None),
        timings=TIMINGS,
        metadata=None,
    ),
]
VALID: list[tuple[str, BaseModel]] = [
    *(("chat.request.v1", m) for m in REQUESTS),
    *(("chat.cancel.v1", m) for m in CANCELS),
    *(("chat.delta.v1", m) for m in DELTAS),
    *(("chat.response.v1", m) for m in RESPONSES),
]


def _wire(message: BaseModel) -> dict[str, Any]:
    encoded: bytes = message.encode()  # type: ignore[attr-defined]
    document: dict[str, Any] = json.loads(encoded)
    return document


# --- invalid samples: (schema, a valid sample, a change) -------------------------------------

_R = _wire(REQUESTS[1])
_D = _wire(DELTAS[1])
_P = _wire(RESPONSES[0])
_F = _wire(RESPONSES[1])
_C = _wire(RESPONSES[2])
_X = _wire(RESPONSES[3])
_K = _wire(RESPONSES[4])
_Q = _wire(CANCELS[1])
_DELETE = object()

INVALID: list[tuple[str, dict[str, Any], str, object]] = [
    ("chat.request.v1", _R, "request_id", ""),
    ("chat.request.v1", _R, "request_id", "r" * 201),
    ("chat.request.v1", _R, "request_id", _DELETE),
    ("chat.request.v1", _R, "conversation_id", 3),
    ("chat.request.v1", _R, "input", []),
    ("chat.request.v1", _R, "input", [{"role": "robot", "content": "x"}]),
    ("chat.request.v1", _R, "input", [{"role": "user"}]),
    ("chat.request.v1", _R, "input", [{"role": "user", "content": 1}]),
    ("chat.request.v1", _R, "input", {"role": "user", "content": "x"}),
    ("chat.request.v1", _R, "input", None),
    ("chat.request.v1", _R, "assistant_id", ""),
    ("chat.request.v1", _R, "assistant_id", 5),
    ("chat.request.v1", _R, "assistant_overrides", []),
    ("chat.request.v1", _R, "metadata", "x"),
    ("chat.request.v1", _R, "reset_context", "true"),
    ("chat.request.v1", _R, "reset_context", None),
    ("chat.request.v1", _R, "schema", "chat.request.v2"),
    ("chat.request.v1", _R, "schema", None),
    ("chat.request.v1", _R, "expires_at", "2026-11-30T09:00:00"),
    ("chat.request.v1", _R, "expires_at", "2026-11-30"),
    ("chat.request.v1", _R, "expires_at", "tomorrow"),
    ("chat.request.v1", _R, "expires_at", 1764493200),
    ("chat.request.v1", _R, "supersede", "true"),
    ("chat.request.v1", _R, "supersede", None),
    ("chat.request.v1", _R, "schema", "chat.cancel.v1"),
    ("chat.cancel.v1", _Q, "schema", _DELETE),
    ("chat.cancel.v1", _Q, "schema", "chat.request.v1"),
    ("chat.cancel.v1", _Q, "conversation_id", _DELETE),
    ("chat.cancel.v1", _Q, "conversation_id", ""),
    ("chat.cancel.v1", _Q, "conversation_id", 7),
    ("chat.cancel.v1", _Q, "request_id", ""),
    ("chat.cancel.v1", _Q, "request_id", "r" * 201),
    ("chat.cancel.v1", _Q, "request_id", 1),
    ("chat.delta.v1", _D, "attempt", 0),
    ("chat.delta.v1", _D, "attempt", True),
    ("chat.delta.v1", _D, "attempt", 1.5),
    ("chat.delta.v1", _D, "seq", -1),
    ("chat.delta.v1", _D, "seq", "1"),
    ("chat.delta.v1", _D, "chat_id", None),
    ("chat.delta.v1", _D, "chat_id", ""),
    ("chat.delta.v1", _D, "delta", None),
    ("chat.delta.v1", _D, "delta", _DELETE),
    ("chat.delta.v1", _D, "ts", -0.5),
    ("chat.delta.v1", _D, "ts", "1"),
    ("chat.delta.v1", _D, "conversation_id", "c" * 201),
    ("chat.response.v1", _P, "status", "done"),
    ("chat.response.v1", _P, "error", {"code": "x", "message": "m", "retryable": False}),
    ("chat.response.v1", _P, "error", {"code": "x"}),
    ("chat.response.v1", _F, "error", None),
    ("chat.response.v1", _F, "error", {"code": "", "message": "m", "retryable": False}),
    ("chat.response.v1", _F, "error", {**_F["error"], "http_status": 99}),
    ("chat.response.v1", _F, "error", {**_F["error"], "http_status": 600}),
    ("chat.response.v1", _F, "error", {**_F["error"], "retryable": 0}),
    ("chat.response.v1", _P, "chat_id", ""),
    ("chat.response.v1", _P, "previous_chat_id", 1),
    ("chat.response.v1", _P, "metadata", _DELETE),
    ("chat.response.v1", _P, "delta_count", -1),
    ("chat.response.v1", _P, "attempts", -1),
    ("chat.response.v1", _P, "context_reset", "false"),
    ("chat.response.v1", _P, "timings", {"queued_ms": 1, "total_ms": 2}),
    ("chat.response.v1", _P, "timings", {"queued_ms": -1, "first_delta_ms": None, "total_ms": 2}),
    ("chat.response.v1", _P, "timings", None),
    ("chat.response.v1", _P, "text", None),
    ("chat.response.v1", _C, "cost", {"usd": -0.1, "prompt_tokens": 1, "completion_tokens": 1}),
    ("chat.response.v1", _C, "cost", {"usd": 0.1, "prompt_tokens": 1}),
    ("chat.response.v1", _C, "cost", {"usd": 0.1, "prompt_tokens": -1, "completion_tokens": 1}),
    ("chat.response.v1", _C, "cost", 0.1),
    ("chat.response.v1", _C, "stream_complete", "false"),
    ("chat.response.v1", _X, "error", None),
    ("chat.response.v1", _X, "status", "timeout"),
    ("chat.response.v1", _K, "error", None),
]


def _changed(document: dict[str, Any], field: str, value: object) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    if value is _DELETE:
        del changed[field]
    else:
        changed[field] = value
    return changed


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schema_files_are_valid_2020_12_schemas(name: str) -> None:
    """Each file is itself a valid JSON Schema 2020-12 document with a description."""
    schema = _schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert name in schema["title"]
    assert schema["description"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_properties_match_model_fields(name: str) -> None:
    """Every model field is a schema property and every schema property is a model field."""
    assert set(_schema(name)["properties"]) == set(_fields(MODELS[name]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_required_sets_agree(name: str) -> None:
    """The schema's required list is exactly the model's required fields."""
    required = {field for field, is_required in _fields(MODELS[name]).items() if is_required}
    assert set(_schema(name)["required"]) == required


def test_decode_record_agrees_with_the_cancel_schema() -> None:
    """decode_record reads the valid cancel samples as cancels and refuses the invalid ones."""
    validator = _validator("chat.cancel.v1")
    for message in CANCELS:
        key = message.conversation_id.encode()
        decoded = decode_record(
            message.encode(), key, max_input_chars=10_000, max_metadata_bytes=10_000
        )
        assert decoded == message
    for name, document, field, value in INVALID:
        if name != "chat.cancel.v1":
            continue
        changed = _changed(document, field, value)
        assert not validator.is_valid(changed)
        if field == "schema":
            continue  # without its schema field the record is read as a request (and refused)
        with pytest.raises(InvalidRequestError):
            decode_record(
                json.dumps(changed).encode(),
                document["conversation_id"].encode(),
                max_input_chars=10_000,
                max_metadata_bytes=10_000,
            )


@pytest.mark.parametrize(
    ("definition", "model"),
    [
        ("chat.request.v1#VapiMessage", VapiMessage),
        ("chat.response.v1#ErrorInfo", ErrorInfo),
        ("chat.response.v1#Timings", Timings),
    ],
)
def test_nested_definitions_match_their_models(definition: str, model: type[BaseModel]) -> None:
    """Nested objects in $defs have the same properties and required sets as their models."""
    name, _, key = definition.partition("#")
    schema = _schema(name)["$defs"][key]
    fields = _fields(model)
    assert set(schema["properties"]) == set(fields)
    assert set(schema["required"]) == {field for field, required in fields.items() if required}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_property_is_described(name: str) -> None:
    """Each property documents itself for other teams (the timings object via its $def)."""
    schema = _schema(name)
    for field, definition in schema["properties"].items():
        if "$ref" in definition:
            definition = schema["$defs"][definition["$ref"].rsplit("/", 1)[1]]
        assert definition.get("description"), f"{name}: {field} has no description"


@pytest.mark.parametrize(
    ("name", "message"), VALID, ids=[f"{name}-{i}" for i, (name, _) in enumerate(VALID)]
)
def test_messages_built_by_the_models_satisfy_the_schema(name: str, message: BaseModel) -> None:
    """What the models encode is valid under the schema file and parses back to the same model."""
    document = _wire(message)
    _validator(name).validate(document)
    assert MODELS[name].model_validate(document) == message


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schema_examples_are_accepted_by_both(name: str) -> None:
    """The examples in each schema file are valid for the schema and for the model."""
    schema = _schema(name)
    assert schema["examples"]
    for example in schema["examples"]:
        _validator(name).validate(example)
        MODELS[name].model_validate(example)


@pytest.mark.parametrize(
    ("name", "document", "field", "value"),
    INVALID,
    ids=[f"{name}-{field}-{value!r:.30}" for name, _, field, value in INVALID],
)
def test_invalid_samples_are_rejected_by_both(
    name: str, document: dict[str, Any], field: str, value: object
) -> None:
    """A sample the schema rejects is also rejected by the model, and the reverse."""
    changed = _changed(document, field, value)
    assert not _validator(name).is_valid(changed)
    assert not _model_accepts(MODELS[name], changed)


def test_unknown_fields_are_accepted_by_both() -> None:
    """Both the schemas and the models let unknown fields through (additionalProperties)."""
    for name, message in VALID:
        document = {**_wire(message), "added_in_v1_1": {"x": 1}}
        assert _validator(name).is_valid(document)
        assert _model_accepts(MODELS[name], document)


#: How a consumer drops duplicate deltas. A request redelivered after a crash or a rebalance runs
#: again from attempt 1, seq 0, on a new Vapi chat: without ``chat_id`` its deltas would collide
#: with those of the run that was cut off.
DELTA_KEY = "(request_id, attempt, chat_id, seq)"
#: One stream of deltas: the text of a stream is its deltas in seq order.
STREAM_KEY = "(request_id, attempt, chat_id)"
#: Every place that tells consumers how to read the delta topic.
DELTA_KEY_TEXTS = {
    "schemas/chat.delta.v1.json": lambda: (SCHEMA_DIR / "chat.delta.v1.json").read_text("utf-8"),
    "README.md": lambda: (SCHEMA_DIR.parent / "README.md").read_text("utf-8"),
    "docs/design.md": lambda: (SCHEMA_DIR.parent / "docs/design.md").read_text("utf-8"),
    "ChatDelta": lambda: ChatDelta.__doc__ or "",
    "vapi_stream_client.folding": lambda: folding.__doc__ or "",
}


@pytest.mark.parametrize("where", sorted(DELTA_KEY_TEXTS))
def test_the_delta_dedupe_key_is_the_same_everywhere(where: str) -> None:
    """Schema, README, design document and code all give consumers one dedupe key, chat_id in it.

    Every ``(request_id, ...)`` tuple they name is that key or the stream it belongs to.
    """
    text = " ".join(DELTA_KEY_TEXTS[where]().split())
    assert DELTA_KEY in text, f"{where} does not state the dedupe key {DELTA_KEY}"
    for named in re.findall(r"\(request_id,[^)]*\)", text.replace("`", "")):
        assert named in (DELTA_KEY, STREAM_KEY), f"{where} names {named}"


def test_decode_request_agrees_with_the_request_schema() -> None:
    """decode_request accepts the valid request samples and refuses the invalid ones."""
    validator = _validator("chat.request.v1")
    for message in REQUESTS:
        key = message.conversation_id.encode()
        decode_request(message.encode(), key, max_input_chars=10_000, max_metadata_bytes=10_000)
    for name, document, field, value in INVALID:
        if name != "chat.request.v1":
            continue
        changed = _changed(document, field, value)
        assert not validator.is_valid(changed)
        with pytest.raises(InvalidRequestError):
            decode_request(
                json.dumps(changed).encode(),
                document["conversation_id"].encode(),
                max_input_chars=10_000,
                max_metadata_bytes=10_000,
            )


# --- property-based: random edits are judged alike -------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=2**40)
    # Integral floats are the one documented divergence (JSON Schema calls 1.0 an integer).
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
    | st.text(max_size=3)
    | st.sampled_from(["completed", "failed", "user", "chat.request.v1"])
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["role", "content", "code", "message", "retryable", "http_status", "x"]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=8,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from(VALID),
    edits=st.lists(st.tuples(st.integers(min_value=0), _values | st.just(_DELETE)), max_size=3),
)
def test_random_edits_are_judged_alike(
    sample: tuple[str, BaseModel], edits: list[tuple[int, object]]
) -> None:
    """Setting or deleting random fields of a valid message never splits schema and model."""
    name, message = sample
    document = _wire(message)
    fields = sorted(_fields(MODELS[name]))
    for index, value in edits:
        field = fields[index % len(fields)]
        if value is _DELETE:
            document.pop(field, None)
        else:
            document[field] = value
    assert _validator(name).is_valid(document) == _model_accepts(MODELS[name], document)


def test_expires_at_has_one_pattern_in_the_model_and_the_schema() -> None:
    """The RFC 3339 rule of ``expires_at`` is written once in each and they are the same."""
    assert _schema("chat.request.v1")["properties"]["expires_at"]["pattern"] == RFC3339_PATTERN
