"""Unit tests for the simulator's ``CreateChatDTO`` validation."""

from __future__ import annotations

import pytest

from worker.simulator.errors import ChatRejectedError
from worker.simulator.validation import CreateChatBody, validate_create_chat_body

pytestmark = pytest.mark.unit


def test_minimal_valid_request() -> None:
    """``assistantId`` and a string input are enough; streaming defaults to off."""
    request = validate_create_chat_body({"assistantId": "a1", "input": "hi"})
    assert request == CreateChatBody(input="hi", assistant_id="a1")
    assert request.owner == "assistant:a1"


def test_full_request() -> None:
    """Every documented field is accepted and the ones the simulator uses are kept."""
    body = {
        "assistantId": "a1",
        "assistantOverrides": {"variableValues": {"x": 1}},
        "name": "n" * 40,
        "previousChatId": "chat_1",
        "input": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "stream": True,
        "transport": {},
    }
    request = validate_create_chat_body(body)
    assert request.previous_chat_id == "chat_1"
    assert request.stream is True
    assert request.name == "n" * 40


def test_transient_assistant_and_context_only_requests_are_valid() -> None:
    """A transient ``assistant``, or only ``previousChatId``/``sessionId``, is allowed."""
    assert validate_create_chat_body({"assistant": {}, "input": "x"}).owner == "transient"
    assert validate_create_chat_body({"previousChatId": "c", "input": "x"}).owner is None
    assert validate_create_chat_body({"sessionId": "s", "input": "x"}).session_id == "s"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("text", "request body must be a JSON object"),
        ({"assistantId": "a"}, "input should not be null or undefined"),
        ({"assistantId": "a", "input": ""}, "input should not be empty"),
        ({"assistantId": "a", "input": []}, "input must be a string or a non-empty array"),
        ({"assistantId": "a", "input": 5}, "input must be a string or a non-empty array"),
        ({"assistantId": "a", "input": ["x"]}, "input.0 must be an object"),
        ({"assistantId": "a", "input": [{"role": "bot", "content": "x"}]}, "input.0.role"),
        ({"assistantId": "a", "input": [{"role": "user"}]}, "input.0.content must be a string"),
        ({"input": "x"}, "one of assistantId, assistant, sessionId or previousChatId"),
        (
            {"assistantId": "a", "input": "x", "sessionId": "s", "previousChatId": "c"},
            "mutually exclusive",
        ),
        ({"assistantId": "a", "input": "x", "name": "n" * 41}, "name must be shorter"),
        ({"assistantId": "a", "input": "x", "colour": "red"}, "property colour should not exist"),
        ({"assistantId": 7, "input": "x"}, "assistantId must be a string"),
        ({"assistantId": "a", "input": "x", "stream": "yes"}, "stream must be a boolean"),
    ],
)
def test_invalid_bodies_are_rejected_with_400(body: object, problem: str) -> None:
    """Each rule violation gives a 400 whose message list names the problem."""
    with pytest.raises(ChatRejectedError) as caught:
        validate_create_chat_body(body)
    assert caught.value.status == 400
    assert isinstance(caught.value.message, list)
    assert any(problem in line for line in caught.value.message), caught.value.message


def test_all_problems_are_reported_together() -> None:
    """Like Vapi, every problem is listed, not just the first."""
    with pytest.raises(ChatRejectedError) as caught:
        validate_create_chat_body({"input": "", "foo": 1, "name": 5})
    assert len(caught.value.message) == 4
