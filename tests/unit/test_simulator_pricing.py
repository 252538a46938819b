"""Unit tests for the simulator's token counts and prices."""

from __future__ import annotations

import pytest

from worker.simulator.pricing import (
    COMPLETION_USD_PER_MTOK,
    MESSAGE_OVERHEAD_TOKENS,
    PROMPT_USD_PER_MTOK,
    chat_costs,
    count_tokens,
    prompt_tokens,
)

pytestmark = pytest.mark.unit


def test_tokens_are_the_streamed_words_and_messages_add_framing() -> None:
    assert count_tokens("Reply to: hi") == 3
    assert count_tokens("") == 0
    messages = [{"role": "user", "content": "a b"}, {"role": "tool", "content": None}]
    assert prompt_tokens(messages) == 2 + 2 * MESSAGE_OVERHEAD_TOKENS


def test_cost_is_the_one_model_entry() -> None:
    cost, costs = chat_costs(1000, 500)
    expected = (1000 * PROMPT_USD_PER_MTOK + 500 * COMPLETION_USD_PER_MTOK) / 1e6
    assert cost == pytest.approx(expected)
    assert costs == [
        {
            "type": "model",
            "model": {"provider": "simulator", "model": "sim-model"},
            "promptTokens": 1000,
            "completionTokens": 500,
            "cost": cost,
        }
    ]
