"""Pure: what a simulated chat costs, in the shape of Vapi's ``Chat.cost`` and ``Chat.costs``.

Why: the worker reports each reply's spend from the chat Vapi bills (``GET /chat/{id}``), so the
simulator's chats carry figures that behave like real ones: more context, more prompt tokens;
a longer reply, more completion tokens. A token is one of ``replies.split_tokens``'s words, and
every message adds ``MESSAGE_OVERHEAD_TOKENS`` (its role and framing), as chat models count them.
The prices are a hosted model's list prices per million tokens; ``cost`` is the sum of ``costs``,
which here is the one ``model`` entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from worker.simulator.replies import split_tokens

#: USD per million tokens (a mid-sized hosted model's list prices).
PROMPT_USD_PER_MTOK: Final = 2.50
COMPLETION_USD_PER_MTOK: Final = 10.00
MESSAGE_OVERHEAD_TOKENS: Final = 4
#: What ``ModelCost.model`` says the chat ran on.
MODEL: Final = {"provider": "simulator", "model": "sim-model"}


def count_tokens(text: str) -> int:
    """Tokens of ``text``: its words as the simulator streams them."""
    return len(split_tokens(text))


def prompt_tokens(messages: Sequence[Mapping[str, object]]) -> int:
    """Tokens the model reads: every message's content plus its framing."""
    total = 0
    for message in messages:
        content = message.get("content")
        total += MESSAGE_OVERHEAD_TOKENS + (
            count_tokens(content) if isinstance(content, str) else 0
        )
    return total


def model_cost_usd(prompt: int, completion: int) -> float:
    """The model's charge for ``prompt`` tokens read and ``completion`` tokens written."""
    return (prompt * PROMPT_USD_PER_MTOK + completion * COMPLETION_USD_PER_MTOK) / 1_000_000


def chat_costs(prompt: int, completion: int) -> tuple[float, list[dict[str, object]]]:
    """Vapi's ``cost`` and ``costs`` for a chat: the total, and its one ``model`` entry."""
    cost = model_cost_usd(prompt, completion)
    entry: dict[str, object] = {
        "type": "model",
        "model": dict(MODEL),
        "promptTokens": prompt,
        "completionTokens": completion,
        "cost": cost,
    }
    return cost, [entry]
