"""Unit tests for reading a ``Chat`` object: the reply's cost and its whole text."""

from __future__ import annotations

import pytest

from worker.vapi.chat import ChatReading, ReplyCost, read_chat, stream_complete

pytestmark = pytest.mark.unit


def _model(prompt: object, completion: object, cost: object = 0.001) -> dict[str, object]:
    return {
        "type": "model",
        "model": {},
        "promptTokens": prompt,
        "completionTokens": completion,
        "cost": cost,
    }


def test_cost_is_the_chats_total_and_the_model_entries_tokens() -> None:
    chat = {
        "id": "c",
        "cost": 0.0042,
        "costs": [_model(100, 20), {"type": "chat", "cost": 0.002}, _model(50.0, 5)],
        "output": [{"role": "assistant", "content": "Hi"}],
    }
    assert read_chat(chat) == ChatReading(
        output_text="Hi", cost=ReplyCost(usd=0.0042, prompt_tokens=150, completion_tokens=25)
    )


def test_a_chat_without_a_cost_has_none_and_without_model_entries_no_tokens() -> None:
    assert read_chat({"output": []}).cost is None
    assert read_chat({"cost": 0.5}).cost == ReplyCost(0.5, 0, 0)
    assert read_chat({"cost": 0, "costs": "x"}).cost == ReplyCost(0.0, 0, 0)


@pytest.mark.parametrize("cost", [None, "0.1", True, -1, float("nan"), float("inf"), [1]])
def test_an_unreadable_cost_is_none(cost: object) -> None:
    assert read_chat({"cost": cost}).cost is None


def test_unreadable_token_counts_count_as_zero() -> None:
    chat = {"cost": 0.1, "costs": [_model("9", None), _model(-3, True), _model(2, 3), "junk"]}
    assert read_chat(chat).cost == ReplyCost(0.1, 2, 3)


def test_output_text_joins_the_assistant_contents() -> None:
    chat = {
        "output": [
            {"role": "assistant", "content": "Hel"},
            {"role": "tool", "content": "ignored"},
            {"role": "assistant", "tool_calls": []},
            {"role": "assistant", "content": "lo"},
        ]
    }
    assert read_chat(chat).output_text == "Hello"
    assert read_chat({"output": []}).output_text == ""


@pytest.mark.parametrize("document", [None, [], "chat", {"output": None}, {"output": ["x"]}])
def test_an_unreadable_output_is_none(document: object) -> None:
    assert read_chat(document).output_text is None


def test_stream_complete_compares_exactly() -> None:
    assert stream_complete("Hello", "Hello") is True
    assert stream_complete("Hel", "Hello") is False
    assert stream_complete("Hello ", "Hello") is False
    assert stream_complete("", "") is True
    assert stream_complete("Hello", None) is None
