"""Unit tests for the per-conversation budget rule and the spend the table keeps."""

from __future__ import annotations

from typing import Any

import pytest

from worker.budget import budget_exceeded
from worker.state import ConversationState

pytestmark = pytest.mark.unit


def test_a_conversation_may_spend_until_it_reaches_the_budget() -> None:
    assert budget_exceeded(0.0, 0.01) is None
    assert budget_exceeded(0.0099, 0.01) is None
    reached = budget_exceeded(0.01, 0.01)
    assert reached is not None
    assert reached.code == "budget_exceeded"
    assert "0.010000 USD" in str(reached)
    assert budget_exceeded(5.0, 0.01) is not None


def test_a_budget_of_zero_is_off() -> None:
    assert budget_exceeded(10**6, 0) is None


def test_the_spend_adds_up_and_survives_the_table_format() -> None:
    state = ConversationState().after_request("r1", "chat1", None, keep=4, cost_usd=0.25)
    state = state.after_request("r2", None, None, keep=4)  # a failed turn: nothing billed known
    state = state.after_request("r3", "chat3", None, keep=4, cost_usd=0.5)
    assert state.spent_usd == pytest.approx(0.75)
    assert ConversationState.from_json(state.to_json()) == state


@pytest.mark.parametrize("stored", [None, "1.5", True, -1, float("nan"), float("inf"), [1]])
def test_an_unreadable_spend_reads_as_nothing_spent(stored: Any) -> None:
    value = {**ConversationState(chat_id="c").to_json(), "spent_usd": stored}
    assert ConversationState.from_json(value).spent_usd == 0.0
    del value["spent_usd"]  # written before the field existed
    assert ConversationState.from_json(value).spent_usd == 0.0
