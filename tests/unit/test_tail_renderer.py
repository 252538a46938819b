"""tail's renderer (duplicates dropped, restarted streams shown, one line per conversation,
one request followed) and its ``--since`` parsing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from worker.console import TailRenderer, parse_since

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


def test_a_response_shows_its_cost_and_the_rest_of_a_short_stream() -> None:
    """The cost of a reply; Vapi's whole text when the stream ended before the reply did."""
    renderer = TailRenderer()
    renderer.on_delta(_delta(0, "Hel"))
    out = renderer.on_response(
        {
            "request_id": "r1",
            "conversation_id": "c1",
            "status": "completed",
            "delta_count": 1,
            "text": "Hello there",
            "cost": {"usd": 0.000215, "prompt_tokens": 6, "completion_tokens": 20},
            "stream_complete": False,
        }
    )
    assert "the stream ended early; the whole reply: Hello there" in out
    assert "completed, 1 deltas, 0.000215 USD (6 + 20 tokens)" in out


def test_an_expired_request_says_so() -> None:
    renderer = TailRenderer()
    error = {"code": "request_expired", "message": "the request expired at ..."}
    out = renderer.on_response(
        {"request_id": "r1", "conversation_id": "c1", "status": "expired", "error": error}
    )
    assert "EXPIRED, not run: the request expired at ..." in out


def test_following_one_request_renders_nothing_of_the_others() -> None:
    """With a request id, deltas and responses of other requests render as nothing."""
    renderer = TailRenderer(request_id="r1")
    other = {**_delta(0, "Other"), "request_id": "r2"}
    out = renderer.on_delta(other) + renderer.on_delta(_delta(0, "Mine"))
    out += renderer.on_response(
        {"request_id": "r2", "conversation_id": "c1", "status": "completed"}
    )
    assert out == "[c1] Mine"
    assert renderer.wants(_delta(1, "x"))
    assert not renderer.wants(other)
    assert not renderer.wants(None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", datetime(2026, 1, 2, 2, 58, 30, tzinfo=UTC)),
        ("10m", datetime(2026, 1, 2, 2, 50, tzinfo=UTC)),
        ("1.5h", datetime(2026, 1, 2, 1, 30, tzinfo=UTC)),
        ("1d", datetime(2026, 1, 1, 3, 0, tzinfo=UTC)),
        ("2026-01-02T01:00:00", datetime(2026, 1, 2, 1, 0, tzinfo=UTC)),
        ("2026-01-02T01:00:00Z", datetime(2026, 1, 2, 1, 0, tzinfo=UTC)),
        ("2026-01-02T03:00:00+02:00", datetime(2026, 1, 2, 1, 0, tzinfo=UTC)),
    ],
)
def test_since_is_a_duration_ago_or_a_time(text: str, expected: datetime) -> None:
    """``tail --since`` takes a duration before now or an ISO time (UTC unless it has an offset),
    as Kafka timestamps (milliseconds since the epoch)."""
    now = datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    assert parse_since(text, now) == int(expected.timestamp() * 1000)


@pytest.mark.parametrize("text", ["", "yesterday", "10 minutes", "-5m", "5w"])
def test_since_rejects_what_it_cannot_read_with_the_forms_it_takes(text: str) -> None:
    """An unreadable ``--since`` is an error that names the accepted forms."""
    with pytest.raises(ValueError, match="duration"):
        parse_since(text, datetime(2026, 1, 2, tzinfo=UTC))
