"""Pure: what a ``Chat`` object from ``GET /chat/{id}`` says about one reply.

Two things are read from it (docs/design.md §11):

* what the reply cost: the chat's ``cost`` (USD, everything Vapi billed for it) and the token
  counts of its ``costs`` entries of ``type: "model"`` (summed: a squad has one per assistant);
* the reply's whole text: the ``content`` of its ``output`` messages of role ``assistant``,
  joined, which is what the stream's ``chat.output[N].content`` deltas add up to.

Vapi's documents are read leniently: anything unreadable counts as "not said" (``None``), never
as an error, because the reply itself has already been delivered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ChatReading", "ReplyCost", "read_chat", "stream_complete"]


@dataclass(frozen=True, slots=True)
class ReplyCost:
    """What one reply cost: USD, and the model's prompt and completion tokens."""

    usd: float
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class ChatReading:
    """The parts of a ``Chat`` the worker uses; ``None`` where the chat does not say."""

    output_text: str | None
    cost: ReplyCost | None


def read_chat(document: object) -> ChatReading:
    """Read a ``Chat`` object (parsed JSON); whatever the shape, never raises."""
    if not isinstance(document, dict):
        return ChatReading(None, None)
    return ChatReading(_output_text(document.get("output")), _cost(document))


def stream_complete(streamed: str, output_text: str | None) -> bool | None:
    """Whether the streamed text is the chat's whole reply; ``None`` when the chat has none."""
    if output_text is None:
        return None
    return streamed == output_text


def _output_text(output: object) -> str | None:
    if not isinstance(output, list):
        return None
    parts: list[str] = []
    for message in output:
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        if message.get("role") == "assistant" and isinstance(content, str):
            parts.append(content)
    return "".join(parts)


def _cost(document: dict[str, Any]) -> ReplyCost | None:
    usd = _amount(document.get("cost"))
    if usd is None:
        return None
    prompt = completion = 0
    costs = document.get("costs")
    for entry in costs if isinstance(costs, list) else ():
        if isinstance(entry, dict) and entry.get("type") == "model":
            prompt += round(_amount(entry.get("promptTokens")) or 0)
            completion += round(_amount(entry.get("completionTokens")) or 0)
    return ReplyCost(usd=usd, prompt_tokens=prompt, completion_tokens=completion)


def _amount(value: object) -> float | None:
    """A finite, non-negative JSON number, else None (a boolean is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None
