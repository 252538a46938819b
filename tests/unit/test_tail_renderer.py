"""tail's renderer (events of the client's folding in, text out: one line per conversation, a
restarted stream shown, the final response's status) and its ``--since`` parsing. The folding
rules themselves are tested in test_client_folding.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vapi_stream_client import ChatDelta, ChatResponse, FollowEvent, StreamFolder, Unreadable
from vapi_stream_client.messages import Cost, ErrorInfo
from worker.console import TailRenderer, parse_since

pytestmark = pytest.mark.unit


def _delta(
    seq: int, text: str, *, attempt: int = 1, chat: str = "chat-1", conversation: str = "c1"
) -> ChatDelta:
    return ChatDelta(
        request_id=f"r-{conversation}",
        conversation_id=conversation,
        chat_id=chat,
        attempt=attempt,
        seq=seq,
        delta=text,
        ts=1.0,
    )


def _response(
    status: str = "completed", *, conversation: str = "c1", chat: str | None = "chat-1"
) -> ChatResponse:
    failed = status == "failed"
    return ChatResponse.model_validate(
        {
            "request_id": f"r-{conversation}",
            "conversation_id": conversation,
            "chat_id": None if failed else chat,
            "previous_chat_id": None,
            "status": status,
            "text": "" if failed else "Hi",
            "delta_count": 0 if failed else 1,
            "attempts": 1,
            "context_reset": False,
            "error": (
                {
                    "code": "vapi_timeout",
                    "message": "no delta",
                    "retryable": True,
                    "http_status": None,
                }
                if failed
                else None
            ),
            "timings": {"queued_ms": 0, "first_delta_ms": None, "total_ms": 1},
            "metadata": None,
        }
    )


def _render(*records: ChatDelta | ChatResponse | Unreadable) -> str:
    folder, renderer, out = StreamFolder(), TailRenderer(), ""
    for record in records:
        events: list[FollowEvent]
        if isinstance(record, ChatDelta):
            events = list(folder.on_delta(record))
        elif isinstance(record, ChatResponse):
            events = list(folder.on_response(record))
        else:
            events = [record]
        out += "".join(renderer.render(event) for event in events)
    return out


def test_a_redelivered_delta_renders_once() -> None:
    """The folding drops the copy; the renderer shows the text once."""
    assert _render(_delta(0, "Hi"), _delta(0, "Hi")) == "[c1] Hi"


def test_a_retry_and_a_crash_redelivery_both_show_as_restarted_streams() -> None:
    """A new attempt, or the same attempt number with a new chat id, is marked as a restart."""
    out = _render(
        _delta(0, "Hel"),
        _delta(0, "Hello", attempt=2, chat="chat-2"),
        _delta(0, "Hello!", attempt=1, chat="chat-3"),
    )
    assert out.count("[stream restarted") == 2
    assert out.endswith("Hello!")


def test_the_final_response_closes_the_line_with_its_status() -> None:
    """A completed response ends the conversation's line and names its delta count; a failed one
    names its error."""
    assert "completed, 1 deltas (request r-c1)" in _render(_delta(0, "Hi"), _response())
    assert "FAILED vapi_timeout: no delta" in _render(_response("failed"))


def test_conversations_take_turns_on_their_own_lines() -> None:
    """Interleaved conversations each get a line prefixed with their id."""
    out = _render(_delta(0, "a"), _delta(0, "x", conversation="c2"), _delta(1, "b"))
    assert out == "[c1] a\n[c2] x\n[c1] b"


def test_an_unreadable_record_is_reported_where_it_is() -> None:
    """A record that is not the contract is named with its topic, partition and offset."""
    out = _render(Unreadable("chat.deltas", 2, 7, b"c1", "seq: Field required"))
    assert out == "[unreadable record chat.deltas[2]@7: seq: Field required]\n"


def test_a_response_shows_its_cost_and_the_rest_of_a_short_stream() -> None:
    """The cost of a reply; Vapi's whole text when the stream ended before the reply did."""
    response = _response().model_copy(
        update={
            "text": "Hello there",
            "cost": Cost(usd=0.000215, prompt_tokens=6, completion_tokens=20),
            "stream_complete": False,
        }
    )
    out = _render(_delta(0, "Hel"), response)
    assert "the stream ended early; the whole reply: Hello there" in out
    assert "completed, 1 deltas, 0.000215 USD (6 + 20 tokens)" in out


def test_an_expired_request_says_so() -> None:
    expired = _response("failed").model_copy(
        update={
            "status": "expired",
            "error": ErrorInfo(
                code="request_expired",
                message="the request expired at ...",
                retryable=False,
                http_status=None,
            ),
        }
    )
    assert "EXPIRED, not run: the request expired at ..." in _render(expired)


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


def test_a_cancelled_request_says_so_with_what_it_streamed() -> None:
    cancelled = _response("failed").model_copy(
        update={
            "status": "cancelled",
            "delta_count": 1,
            "error": ErrorInfo(
                code="cancelled",
                message="cancelled by the chat.cancel.v1 record at partition 0, offset 7",
                retryable=False,
                http_status=None,
            ),
        }
    )
    out = _render(_delta(0, "Hel"), cancelled)
    assert "Hel" in out
    assert "CANCELLED after 1 deltas: cancelled by the chat.cancel.v1 record" in out
