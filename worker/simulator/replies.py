"""Pure, deterministic reply text: the simulator's stand-in for the model.

Why: tests must predict what the assistant says. The same history and input always give the same
text, the generic reply's length is exact (so a test knows how many deltas to expect), and a tiny
"remember my name" rule proves that conversation context really reached the server.

- The input asks "what's my name" / "what is my name": ``Your name is X.`` when some user message
  in the history or this input said "my name is X", else ``I don't know your name yet.``
- The input says "my name is X": ``Nice to meet you, X! I will remember your name.``
- Otherwise ``reply_tokens`` tokens: ``Reply to: <the input's words> w5 w6 ...`` cut or padded
  with numbered filler words (``wN`` is the N-th token).
- A bulk reply (``bulk_reply``, asked for by a ``pace token_chars=`` directive) replaces all of
  the above: tokens of an exact size, for tests of huge events and very long replies.

A token is a word plus the whitespace after it; the deltas are exactly ``split_tokens(reply)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

_NAME_INTRO_RE = re.compile(r"\bmy name is\s+([^\W\d_][\w'-]*)", re.IGNORECASE)
_NAME_QUESTION_RE = re.compile(r"\bwhat(?:'s|\u2019s|s|\s+is)\s+my\s+name\b", re.IGNORECASE)
_TOKEN_RE = re.compile(r"\S+\s*|\s+")

Message = Mapping[str, object]
UNKNOWN_NAME_REPLY = "I don't know your name yet."


def split_tokens(text: str) -> list[str]:
    """Split text into tokens (a word and its trailing whitespace); they concatenate to ``text``."""
    return _TOKEN_RE.findall(text)


def stated_name(text: str) -> str | None:
    """The last name given as "my name is X" in ``text``, if any."""
    names = _NAME_INTRO_RE.findall(text)
    return names[-1] if names else None


def _latest_name(texts: Iterable[str]) -> str | None:
    found = None
    for text in texts:
        found = stated_name(text) or found
    return found


def _user_texts(history: Sequence[Message]) -> list[str]:
    users = (m for m in history if m.get("role") == "user")
    return [c for m in users if isinstance(c := m.get("content"), str)]


def generic_reply(user_text: str, reply_tokens: int) -> str:
    """``reply_tokens`` words: "Reply to:", the input's words, then filler ``wN`` words."""
    words = ["Reply", "to:", *user_text.split()][:reply_tokens]
    words += [f"w{n}" for n in range(len(words) + 1, reply_tokens + 1)]
    return " ".join(words)


def bulk_reply(tokens: int, token_chars: int, char: str = "x") -> str:
    """``tokens`` tokens of exactly ``token_chars`` characters: ``char`` repeated, then a space."""
    return (char * (token_chars - 1) + " ") * tokens


def compose_reply(history: Sequence[Message], user_text: str, reply_tokens: int) -> str:
    """The assistant's reply to ``user_text`` given the earlier messages of the conversation."""
    if _NAME_QUESTION_RE.search(user_text):
        name = _latest_name([*_user_texts(history), user_text])
        return f"Your name is {name}." if name else UNKNOWN_NAME_REPLY
    name = stated_name(user_text)
    if name:
        return f"Nice to meet you, {name}! I will remember your name."
    return generic_reply(user_text, reply_tokens)
