"""Unit tests for the simulator's ``[[sim:...]]`` directive parsing."""

from __future__ import annotations

import pytest

from worker.simulator.directives import Pace, parse_input, parse_text
from worker.simulator.errors import SpecError
from worker.simulator.faults import DisconnectFault, StatusFault

pytestmark = pytest.mark.unit


def test_text_without_directives_is_unchanged() -> None:
    """Plain text passes through with default pacing and no faults."""
    assert parse_text("hello world") == ("hello world", Pace(), [])


def test_pace_directive_is_parsed_and_stripped() -> None:
    """A pace directive sets tokens, delay and first-delta latency, and leaves no trace."""
    text, pace, faults = parse_text("hi [[sim:pace tokens=3 delay_ms=5 first_ms=250]] there")
    assert text == "hi there"
    assert pace == Pace(tokens=3, delay_s=0.005, first_s=0.25)
    assert faults == []


def test_later_pace_values_override_earlier_ones() -> None:
    """Two pace directives merge, the later value winning per field."""
    _, pace, _ = parse_text("[[sim:pace tokens=3 delay_ms=1]] x [[sim:pace tokens=7]]")
    assert pace == Pace(tokens=7, delay_s=0.001)


def test_pace_directive_sets_the_size_and_character_of_bulk_tokens() -> None:
    """``token_chars`` and ``char`` shape a bulk reply (a huge event, a very long reply)."""
    text, pace, _ = parse_text("go [[sim:pace tokens=2 token_chars=1000000 char=\u20ac]]")
    assert text == "go"
    assert pace == Pace(tokens=2, token_chars=1_000_000, char="\u20ac")
    _, pace, _ = parse_text("[[sim:pace token_chars=5]]")
    assert pace == Pace(token_chars=5)


def test_fault_directive_becomes_a_rule_with_times() -> None:
    """A fault directive yields a typed fault and its ``times`` limit."""
    text, _, faults = parse_text("go [[sim:fault status code=429 retry_after=2 times=2]]")
    assert text == "go"
    assert [(f.fault, f.times) for f in faults] == [(StatusFault(code=429, retry_after="2"), 2)]


def test_quoted_values_may_contain_spaces() -> None:
    """Shell-style quoting lets an HTTP-date be a Retry-After value."""
    _, _, faults = parse_text(
        '[[sim:fault status code=503 retry_after="Wed, 21 Oct 2015 07:28:00 GMT"]]'
    )
    assert faults[0].fault == StatusFault(code=503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")


@pytest.mark.parametrize(
    "text",
    [
        "[[sim:nope]]",
        "[[sim:pace tokens=-1]]",
        "[[sim:pace tokens=1.5]]",
        "[[sim:pace speed=3]]",
        "[[sim:pace tokens]]",
        "[[sim:pace token_chars=1]]",
        "[[sim:pace token_chars=2.5]]",
        "[[sim:pace token_chars=3 char=ab]]",
        "[[sim:pace token_chars=3 char=' ']]",
        "[[sim:pace char=x]]",
        "[[sim:fault]]",
        "[[sim:fault explode]]",
        "[[sim:fault stall after=x]]",
        "[[sim:fault status code=200]]",
        "[[sim:fault status code=429 colour=red]]",
        "[[sim:fault malformed line=weird]]",
        "[[sim:fault status retry_after=soon]]",
        "[[sim:fault reset times=two]]",
        '[[sim:fault status message="unclosed]]',
    ],
)
def test_bad_directives_are_rejected_with_a_reason(text: str) -> None:
    """Every malformed directive raises ``SpecError`` instead of being silently ignored."""
    with pytest.raises(SpecError):
        parse_text(text)


def test_string_input_becomes_one_user_message() -> None:
    """A string input is stored as one user message, directives stripped, raw text kept."""
    parsed = parse_input("Hello [[sim:fault disconnect after=2]]")
    assert parsed.messages == ({"role": "user", "content": "Hello"},)
    assert parsed.user_text == "Hello"
    assert parsed.raw_text == "Hello [[sim:fault disconnect after=2]]"
    assert [f.fault for f in parsed.faults] == [DisconnectFault(after=2)]


def test_message_array_input_collects_directives_from_every_message() -> None:
    """Directives are found in any message; the reply reads the user messages only."""
    parsed = parse_input(
        [
            {"role": "system", "content": "Be brief [[sim:pace tokens=4]]"},
            {"role": "user", "content": "Hi there [[sim:fault reset times=1]]", "name": "u"},
        ]
    )
    assert parsed.messages == (
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hi there", "name": "u"},
    )
    assert parsed.user_text == "Hi there"
    assert parsed.pace == Pace(tokens=4)
    assert [(f.kind, f.times) for f in parsed.faults] == [("reset", 1)]
