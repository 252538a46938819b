"""Pure parsing of the ``[[sim:...]]`` directives a test writes into a chat's input.

Why: end-to-end tests reach the simulator only through Kafka, so the request's input text is the
one thing they control. A directive in it changes pacing or injects a fault for that one call;
the directive is removed before the simulator computes the reply, so it never shows in the text.

Syntax (anywhere in the input, any number of times; words may be shell-quoted)::

    [[sim:pace tokens=N delay_ms=D first_ms=F]]     generic reply length in tokens (the fixed
                                                    name replies ignore it), gap between deltas,
                                                    delay before the first delta (all optional)
    [[sim:pace token_chars=C char=X]]               a bulk reply instead: every token is C
                                                    characters, C-1 copies of X (default ``x``)
                                                    and a space; one token is one delta event
    [[sim:fault KIND key=value ... times=K]]        see ``worker.simulator.faults`` for the kinds

Later ``pace`` values override earlier ones; every ``fault`` directive is kept, in order.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from worker.simulator.errors import SpecError
from worker.simulator.faults import FaultRule, parse_fault_spec, parse_params

_DIRECTIVE_RE = re.compile(r"\s*\[\[sim:(?P<name>\w*)(?P<args>[^\]]*)\]\]")
Message = Mapping[str, object]


@dataclass(frozen=True)
class Pace:
    """Per-call overrides of the simulator's pacing; ``None`` keeps the server's setting."""

    tokens: int | None = None
    delay_s: float | None = None
    first_s: float | None = None
    #: Set: the reply is ``replies.bulk_reply`` of tokens this long, made of ``char``.
    token_chars: int | None = None
    char: str | None = None


@dataclass(frozen=True)
class ParsedInput:
    """A chat input with its directives taken out.

    ``messages`` is the input as a message list with directives stripped (what the chat stores),
    ``user_text`` the user's words the reply is computed from, ``raw_text`` the input as sent
    (what fault rules match against and what ``times`` counts by when there is no request id).
    """

    messages: tuple[dict[str, object], ...]
    user_text: str
    raw_text: str
    pace: Pace
    faults: tuple[FaultRule, ...]


def _parse_pace(args: str, pace: Pace) -> Pace:
    params = parse_params(_words(args), where="pace")
    unknown = set(params) - {"tokens", "delay_ms", "first_ms", "token_chars", "char"}
    if unknown:
        raise SpecError(f"pace: unknown parameter(s) {', '.join(sorted(unknown))}")
    if "tokens" in params:
        pace = replace(pace, tokens=int(_number("tokens", params["tokens"], whole=True)))
    if "token_chars" in params:
        token_chars = int(_number("token_chars", params["token_chars"], whole=True))
        if token_chars < 2:
            raise SpecError("pace: token_chars must be >= 2 (a character and a space)")
        pace = replace(pace, token_chars=token_chars)
    if "char" in params:
        char = params["char"]
        if len(char) != 1 or char.isspace():
            raise SpecError(f"pace: char={char!r} must be one character, not a space")
        pace = replace(pace, char=char)
    if pace.char is not None and pace.token_chars is None:
        raise SpecError("pace: char needs token_chars")
    if "delay_ms" in params:
        pace = replace(pace, delay_s=_number("delay_ms", params["delay_ms"]) / 1000)
    if "first_ms" in params:
        pace = replace(pace, first_s=_number("first_ms", params["first_ms"]) / 1000)
    return pace


def _number(key: str, raw: str, *, whole: bool = False) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SpecError(f"pace: {key}={raw!r} is not a number") from None
    if value < 0 or (whole and value != int(value)):
        raise SpecError(f"pace: {key} must be a {'whole ' if whole else ''}number >= 0")
    return value


def _words(args: str) -> list[str]:
    try:
        return shlex.split(args)
    except ValueError as exc:
        raise SpecError(f"directive {args.strip()!r}: {exc}") from None


def parse_text(text: str, pace: Pace | None = None) -> tuple[str, Pace, list[FaultRule]]:
    """Strip the directives out of ``text``; return the clean text, the pace and the faults."""
    pace = pace or Pace()
    faults: list[FaultRule] = []
    for match in _DIRECTIVE_RE.finditer(text):
        name, args = match["name"], match["args"]
        if name == "pace":
            pace = _parse_pace(args, pace)
        elif name == "fault":
            faults.append(parse_fault_spec(args))
        else:
            raise SpecError(f"unknown directive [[sim:{name}...]], expected pace or fault")
    return _DIRECTIVE_RE.sub("", text).strip(), pace, faults


def parse_input(raw: str | Sequence[Message]) -> ParsedInput:
    """Parse a chat ``input`` (a string, or a list of ``{role, content}`` messages)."""
    if isinstance(raw, str):
        text, pace, faults = parse_text(raw)
        return ParsedInput(({"role": "user", "content": text},), text, raw, pace, tuple(faults))
    pace, all_faults, messages = Pace(), [], []
    for message in raw:
        content = message.get("content")
        if isinstance(content, str):
            content, pace, faults = parse_text(content, pace)
            all_faults.extend(faults)
        messages.append({**message, "content": content})
    return ParsedInput(
        messages=tuple(messages),
        user_text=_user_words(messages),
        raw_text="\n".join(str(m.get("content") or "") for m in raw),
        pace=pace,
        faults=tuple(all_faults),
    )


def _user_words(messages: Sequence[Message]) -> str:
    """The user's text; falls back to every message when no ``user`` message is present."""
    users = [m for m in messages if m.get("role") == "user"] or list(messages)
    return " ".join(c for m in users if isinstance(c := m.get("content"), str) and c)
