"""tail's renderer: duplicates dropped, restarted streams shown, one line per conversation."""

from __future__ import annotations

from typing import Any

import pytest

from worker.console import TailRenderer

pytestmark = pytest.mark.unit


def _delta(seq: int, text: str, *, attempt: int = 1, chat: str = "chat-1") -> dict[str, Any]:
    return {
        "request_id": "r1",
        "conversation_id": "c1",
        "chat_id": chat,
        "attempt": attempt,
        "seq": seq,
        "delta": text,
    }


def test_a_redelivered_delta_is_dropped() -> None:
    """The same (request, attempt, chat, seq) twice renders once."""
    renderer = TailRenderer()
    out = renderer.on_delta(_delta(0, "Hi")) + renderer.on_delta(_delta(0, "Hi"))
    assert out == "[c1] Hi"


def test_a_retry_and_a_crash_redelivery_both_show_as_restarted_streams() -> None:
    """A new attempt, or the same attempt number with a new chat id, is marked as a restart."""
    renderer = TailRenderer()
    out = renderer.on_delta(_delta(0, "Hel"))
    out += renderer.on_delta(_delta(0, "Hello", attempt=2, chat="chat-2"))
    out += renderer.on_delta(_delta(0, "Hello!", attempt=1, chat="chat-3"))
    assert out.count("[stream restarted") == 2
    assert out.endswith("Hello!")


def test_the_final_response_closes_the_line_with_its_status() -> None:
    """A completed response ends the conversation's line and names its delta count."""
    renderer = TailRenderer()
    renderer.on_delta(_delta(0, "Hi"))
    out = renderer.on_response(
        {"request_id": "r1", "conversation_id": "c1", "status": "completed", "delta_count": 1}
    )
    assert "completed, 1 deltas" in out
