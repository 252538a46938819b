"""Unit tests for the exact SSE bytes the simulator writes."""

from __future__ import annotations

import pytest

from worker.simulator.events import DONE_EVENT, delta_event, malformed_event

pytestmark = pytest.mark.unit


def test_delta_event_bytes() -> None:
    """A delta is one ``data:`` line of compact JSON in Vapi's key order, then a blank line."""
    assert delta_event("chat_1", "h\u00e9 ") == (
        b'data: {"id":"chat_1","path":"chat.output[0].content","delta":"h\xc3\xa9 "}\n\n'
    )
    assert delta_event("chat_1", "x", "s1") == (
        b'data: {"id":"chat_1","sessionId":"s1","path":"chat.output[0].content","delta":"x"}\n\n'
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("json", b"data: {not json\n\n"),
        ("nofield", b'{"id":"c","path":"chat.output[0].content","delta":"?"}\n\n'),
        ("nodelta", b'data: {"id":"c","path":"chat.output[0].content"}\n\n'),
        ("utf8", b'data: {"id":"c","path":"chat.output[0].content","delta":"\xff\xfe"}\n\n'),
    ],
)
def test_malformed_event_bytes(kind: str, expected: bytes) -> None:
    """Each malformed line kind produces its documented bytes."""
    assert malformed_event(kind, "c") == expected


def test_done_marker_bytes() -> None:
    """The optional end marker is ``data: [DONE]`` and a blank line."""
    assert DONE_EVENT == b"data: [DONE]\n\n"
