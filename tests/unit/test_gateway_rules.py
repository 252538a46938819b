"""The gateway's pure parts: conversation tokens, SSE event ids (cursors) and what a resume
from any of them replays, and the configuration it refuses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from aiokafka import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from worker.config import Settings
from worker.errors import ConfigError
from worker.gateway.cursor import Cursor, CursorError, SseEvent
from worker.gateway.feed import Subscription, _fold_range
from worker.gateway.server import gateway_secret
from worker.gateway.tokens import issue_token, token_is_valid

pytestmark = pytest.mark.unit


def test_a_token_is_the_readmes_three_lines() -> None:
    """The operator's backend computes the same token with the standard library alone."""
    secret, conversation = "s3cret-s3cret-s3cret", "conv-42"
    digest = hmac.new(secret.encode(), conversation.encode(), hashlib.sha256).digest()
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert issue_token(secret, conversation) == expected
    assert "=" not in expected
    assert len(expected) == 43
    assert token_is_valid(secret, conversation, expected)


@pytest.mark.parametrize(
    "token",
    ["", "x", "conv-42", issue_token("another-secret-xxxx", "conv-42"), "é" * 43],
)
def test_a_wrong_token_is_refused(token: str) -> None:
    assert not token_is_valid("s3cret-s3cret-s3cret", "conv-42", token)
    assert not token_is_valid("s3cret-s3cret-s3cret", "conv-43", issue_token("s", "conv-42"))


@pytest.mark.parametrize(
    "cursor",
    [
        Cursor(0, 0, 0, 0),
        Cursor(3, 17, 3, 9),
        Cursor(1, 5, 2, 1, ("d", 1)),
        Cursor(0, 1, 0, 4, ("r", 1)),
    ],
)
def test_a_cursor_survives_its_text(cursor: Cursor) -> None:
    assert Cursor.parse(cursor.encode()) == cursor


@pytest.mark.parametrize(
    "text",
    [
        "",
        "9",
        "1-2",
        "a.1-0.2",
        "0.1-0.2-x1",
        "0.0-0.2-d1",
        "0.1-0.0-r1",
        "0.1-0.2-d0",
        "0.1-0.2\n",
        "-1.1-0.2",
        "0." + "9" * 30 + "-0.1",
    ],
)
def test_a_foreign_event_id_is_refused(text: str) -> None:
    with pytest.raises(CursorError):
        Cursor.parse(text)


def _record(topic: str, offset: int, ts: int, key: str, body: dict[str, object]) -> ConsumerRecord:
    return ConsumerRecord(
        topic, 0, offset, ts, 0, key.encode(), json.dumps(body).encode(), None, 0, 0, ()
    )


def _delta(request: str, conv: str, seq: int, chat: str, attempt: int = 1) -> dict[str, object]:
    return {
        "request_id": request,
        "conversation_id": conv,
        "chat_id": chat,
        "attempt": attempt,
        "seq": seq,
        "delta": f"{request}/{chat}/{seq} ",
        "ts": 1.0,
    }


def _response(request: str, conv: str, chat: str, text: str) -> dict[str, object]:
    return {
        "request_id": request,
        "conversation_id": conv,
        "chat_id": chat,
        "previous_chat_id": None,
        "status": "completed",
        "text": text,
        "delta_count": 1,
        "attempts": 1,
        "context_reset": False,
        "error": None,
        "timings": {"queued_ms": 1, "first_delta_ms": 2, "total_ms": 3},
        "metadata": None,
    }


def _partition(plan: list[tuple[str, int, int]]) -> dict[str, list[ConsumerRecord]]:
    """A partition pair's records from (conversation, request, kind) steps: deltas of two
    attempts (a restart), a duplicate, another conversation's records, responses."""
    deltas: list[ConsumerRecord] = []
    responses: list[ConsumerRecord] = []
    for ts, (conv, request, kind) in enumerate(plan):
        rid = f"{conv}-r{request}"
        if kind == 0:  # a delta of attempt 1
            seq = sum(1 for r in deltas if r.key == conv.encode())
            deltas.append(_record("d", len(deltas), ts, conv, _delta(rid, conv, seq, "a")))
        elif kind == 1:  # a retry's delta: a new stream, a restart
            deltas.append(_record("d", len(deltas), ts, conv, _delta(rid, conv, 0, "b", 2)))
        elif kind == 2 and deltas:  # the last delta again (at least once delivery)
            last = deltas[-1]
            deltas.append(_record("d", len(deltas), ts, last.key.decode(), json.loads(last.value)))
        else:  # a final response naming the first stream (a restart when b was shown)
            responses.append(
                _record("r", len(responses), ts, conv, _response(rid, conv, "a", f"{rid} text"))
            )
    return {"d": deltas, "r": responses}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["c1", "c2"]), st.integers(0, 1), st.integers(0, 3)),
        min_size=1,
        max_size=25,
    )
)
def test_resuming_from_any_event_id_replays_exactly_the_rest(
    plan: list[tuple[str, int, int]],
) -> None:
    """Whatever the records (restarts, duplicates, another conversation interleaved), the
    events after a resume from an event's id are exactly the events that followed it."""
    records = _partition(plan)
    start = Cursor(0, 0, 0, 0)
    whole = _fold_range("c1", records, start, {"d": 0, "r": 0}, 0)
    assert len({e.id for e in whole}) == len(whole)
    for index, event in enumerate(whole):
        since = Cursor.parse(event.id)
        first_d, first_r, skip = since.first_unsent()
        resumed = _fold_range("c1", records, since, {"d": first_d, "r": first_r}, skip)
        assert resumed == whole[index + 1 :], f"resuming from {event.id}"


def test_a_restart_and_its_delta_have_their_own_ids() -> None:
    records = _partition([("c1", 0, 0), ("c1", 0, 1), ("c1", 0, 3)])
    events = _fold_range("c1", records, Cursor(0, 0, 0, 0), {"d": 0, "r": 0}, 0)
    assert [(e.name, e.id) for e in events] == [
        ("delta", "0.1-0.0"),
        ("restart", "0.2-0.0-d1"),
        ("delta", "0.2-0.0"),
        ("restart", "0.2-0.1-r1"),
        ("response", "0.2-0.1"),
    ]
    assert isinstance(events[0], SseEvent)
    assert json.loads(events[1].data)["reason"] == "new_stream"


def test_the_gateway_refuses_a_weak_or_missing_secret_and_a_public_demo() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_SECRET is required"):
        gateway_secret(Settings(gateway_secret=None))
    with pytest.raises(ConfigError, match="at least 16"):
        gateway_secret(Settings(gateway_secret=SecretStr("short")))
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1"):
        gateway_secret(Settings(gateway_demo=True, gateway_host="0.0.0.0"))
    assert len(gateway_secret(Settings(gateway_demo=True, gateway_host="127.0.0.1"))) >= 32
    assert gateway_secret(Settings(gateway_secret=SecretStr("x" * 16))) == "x" * 16


async def test_a_browser_that_reads_too_slowly_is_cut_off_not_buffered_without_end() -> None:
    """A subscription holds at most its queue size; one more event ends it (``None``), and it
    takes nothing after that: the browser resumes from its last id instead."""
    subscription = Subscription("conv-1", queue_size=3)
    events = [SseEvent("delta", f"0.{n}-0.0", "{}") for n in range(1, 6)]
    subscription.put(events[:3])
    assert not subscription.cut_off
    subscription.put(events[3:])
    assert subscription.cut_off
    subscription.put(events[:1])
    queued = [subscription.queue.get_nowait() for _ in range(subscription.queue.qsize())]
    assert queued == [*events[:3], None]
