"""Pure validation of a ``POST /chat`` body against Vapi's ``CreateChatDTO``.

Why: a simulator that accepts anything hides client bugs that real Vapi would reject. The rules
mirror the public OpenAPI spec: ``input`` is required (a non-empty string, or a non-empty array
of ``{role, content}`` messages); at least one of ``assistantId``/``assistant`` (or
``squadId``/``squad``), ``sessionId`` or ``previousChatId`` is required; ``sessionId`` and
``previousChatId`` are mutually exclusive; ``name`` is at most 40 characters; unknown properties
are refused (Vapi's NestJS validation forbids them). Failures come back as Vapi sends them: a 400
whose ``message`` is a list of every problem found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from worker.simulator.errors import ChatRejectedError

MAX_NAME_CHARS = 40
MESSAGE_ROLES = frozenset(("system", "user", "assistant", "tool", "developer"))
_OPTIONAL_FIELDS: dict[str, tuple[type, str]] = {
    "assistantId": (str, "a string"),
    "assistant": (dict, "an object"),
    "squadId": (str, "a string"),
    "squad": (dict, "an object"),
    "assistantOverrides": (dict, "an object"),
    "name": (str, "a string"),
    "sessionId": (str, "a string"),
    "previousChatId": (str, "a string"),
    "stream": (bool, "a boolean value"),
    "transport": (dict, "an object"),
}
_CONTEXT_FIELDS = ("assistantId", "assistant", "squadId", "squad", "sessionId", "previousChatId")
ChatInput = str | list[dict[str, object]]


@dataclass(frozen=True)
class CreateChatBody:
    """The parts of a valid ``CreateChatDTO`` the simulator acts on."""

    input: ChatInput
    assistant_id: str | None = None
    squad_id: str | None = None
    transient_assistant: bool = False
    session_id: str | None = None
    previous_chat_id: str | None = None
    name: str | None = None
    stream: bool = False

    @property
    def owner(self) -> str | None:
        """Who answers; a session or a chain of chats stays with one. ``None``: not given."""
        if self.assistant_id is not None:
            return f"assistant:{self.assistant_id}"
        if self.squad_id is not None:
            return f"squad:{self.squad_id}"
        return "transient" if self.transient_assistant else None


def _input_problems(value: object) -> list[str]:
    if isinstance(value, str):
        return [] if value else ["input should not be empty"]
    if not isinstance(value, list) or not value:
        return ["input must be a string or a non-empty array of messages"]
    problems = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            problems.append(f"input.{i} must be an object")
            continue
        if message.get("role") not in MESSAGE_ROLES:
            problems.append(f"input.{i}.role must be one of: {', '.join(sorted(MESSAGE_ROLES))}")
        if not isinstance(message.get("content"), str) and message.get("role") != "assistant":
            problems.append(f"input.{i}.content must be a string")
    return problems


def _field_problems(body: Mapping[str, object]) -> list[str]:
    problems = []
    for key, value in body.items():
        if key == "input":
            continue
        if key not in _OPTIONAL_FIELDS:
            problems.append(f"property {key} should not exist")
            continue
        expected, description = _OPTIONAL_FIELDS[key]
        if value is not None and not isinstance(value, expected):
            problems.append(f"{key} must be {description}")
    name = body.get("name")
    if isinstance(name, str) and len(name) > MAX_NAME_CHARS:
        problems.append(f"name must be shorter than or equal to {MAX_NAME_CHARS} characters")
    return problems


def _rule_problems(body: Mapping[str, object]) -> list[str]:
    problems = []
    if all(body.get(key) is None for key in _CONTEXT_FIELDS):
        problems.append("one of assistantId, assistant, sessionId or previousChatId is required")
    if body.get("sessionId") is not None and body.get("previousChatId") is not None:
        problems.append("sessionId and previousChatId are mutually exclusive")
    return problems


def _optional_str(body: Mapping[str, object], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) else None


def validate_create_chat_body(body: object) -> CreateChatBody:
    """Check a decoded JSON body; raise ``ChatRejectedError(400, [...])`` listing every problem."""
    if not isinstance(body, dict):
        raise ChatRejectedError(400, ["request body must be a JSON object"])
    if "input" not in body or body["input"] is None:
        problems = ["input should not be null or undefined"]
    else:
        problems = _input_problems(body["input"])
    problems += _field_problems(body) + _rule_problems(body)
    if problems:
        raise ChatRejectedError(400, problems)
    return CreateChatBody(
        input=body["input"],
        assistant_id=_optional_str(body, "assistantId"),
        squad_id=_optional_str(body, "squadId"),
        transient_assistant=body.get("assistant") is not None or body.get("squad") is not None,
        session_id=_optional_str(body, "sessionId"),
        previous_chat_id=_optional_str(body, "previousChatId"),
        name=_optional_str(body, "name"),
        stream=body.get("stream") is True,
    )
