"""Unit tests for the simulator's deterministic replies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.simulator.replies import (
    UNKNOWN_NAME_REPLY,
    bulk_reply,
    compose_reply,
    generic_reply,
    split_tokens,
    stated_name,
)

pytestmark = pytest.mark.unit


@given(st.text())
def test_tokens_concatenate_to_the_text(text: str) -> None:
    """Splitting into tokens never loses or adds a character."""
    assert "".join(split_tokens(text)) == text


@given(st.text(), st.integers(min_value=0, max_value=200))
def test_generic_reply_has_exactly_the_requested_token_count(user_text: str, tokens: int) -> None:
    """The generic reply is exactly ``reply_tokens`` tokens long, whatever the input."""
    assert len(split_tokens(generic_reply(user_text, tokens))) == tokens


def test_generic_reply_echoes_the_input_then_pads() -> None:
    """The generic reply starts with "Reply to:" and the input's words, then numbered fillers."""
    assert generic_reply("hello  big\nworld", 7) == "Reply to: hello big world w6 w7"
    assert generic_reply("one two three four", 3) == "Reply to: one"


def test_replies_are_deterministic() -> None:
    """The same history and input give the same reply."""
    history = [{"role": "user", "content": "my name is Bo"}]
    assert compose_reply(history, "what is my name", 5) == compose_reply(
        history, "what is my name", 5
    )


def test_name_introduction_is_acknowledged() -> None:
    """Saying "my name is X" gets a greeting that uses the name."""
    reply = compose_reply([], "Hello, my name is Alice.", 20)
    assert reply == "Nice to meet you, Alice! I will remember your name."


@pytest.mark.parametrize(
    "question", ["What's my name?", "what is my name", "WHATS MY NAME", "what\u2019s my name"]
)
def test_name_question_is_answered_from_history(question: str) -> None:
    """A name question is answered with the latest name a user message gave."""
    history = [
        {"role": "user", "content": "My name is Alice"},
        {"role": "assistant", "content": "My name is Robot"},
        {"role": "user", "content": "actually my name is Bob"},
    ]
    assert compose_reply(history, question, 20) == "Your name is Bob."


def test_name_question_without_history_admits_ignorance() -> None:
    """Without an earlier "my name is", the simulator says it does not know."""
    assert compose_reply([], "what's my name?", 20) == UNKNOWN_NAME_REPLY


def test_name_given_in_the_same_input_counts() -> None:
    """A name stated in the question's own input is used."""
    assert compose_reply([], "My name is Eve. What's my name?", 20) == "Your name is Eve."


def test_stated_name_takes_one_word_without_punctuation() -> None:
    """The name is the word after "my name is", punctuation dropped, case kept."""
    assert stated_name("MY NAME IS zoë, hi") == "zoë"
    assert stated_name("no name here") is None


@given(
    st.integers(min_value=0, max_value=50),
    st.integers(min_value=2, max_value=300),
    st.characters(exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc")),
)
def test_bulk_reply_is_exactly_tokens_of_token_chars(
    tokens: int, token_chars: int, char: str
) -> None:
    """A bulk reply splits into ``tokens`` deltas of exactly ``token_chars`` characters each."""
    reply = bulk_reply(tokens, token_chars, char)
    parts = split_tokens(reply)
    assert len(parts) == tokens
    assert all(part == char * (token_chars - 1) + " " for part in parts)
