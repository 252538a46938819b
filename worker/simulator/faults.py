"""Faults the simulator can inject, their text syntax, and the bookkeeping behind ``times=K``.

Why: the worker's retry, timeout and stream-repair paths can only be trusted if a test can make
Vapi misbehave on purpose, in a way that reads well in a Kafka message or a command line.

Fault spec (in a ``[[sim:fault ...]]`` directive, a ``--fault`` rule or ``POST /_sim/faults``)::

    KIND [key=value ...] [times=K]

Values may be quoted like shell words (``retry_after="Wed, 21 Oct 2015 07:28:00 GMT"``).

=============  ===========================================================================
``status``     answer with an error status and Vapi's JSON error body instead of a reply.
               ``code=429`` (400-599, default 500), ``retry_after=`` the ``Retry-After``
               header verbatim (seconds or an HTTP-date), ``retry_after_in=S`` an HTTP-date
               S seconds from now, ``message=`` the body's message.
``rawstatus``  ``code=N`` (0-999, default 999): answer a bare ``HTTP/1.1 N`` status line, as a
               broken proxy might, with any number HTTP has no meaning for, then close.
``reset``      abort the TCP connection (RST) before any response byte.
``stall``      ``after=N seconds=S``: after N deltas, pause S seconds, then carry on.
``disconnect`` ``after=N``: after N deltas, close the connection without the final chunk.
``malformed``  ``after=N line=KIND``: after N deltas, send one bad line, then carry on.
               ``json`` ``data: {not json``; ``nofield`` a JSON line without ``data:``;
               ``nodelta`` valid JSON without ``delta``; ``utf8`` bytes that are not UTF-8.
``truncate``   ``after=N``: after N deltas, end the stream cleanly (the final chunk is sent),
               as a proxy closing early would; the chat keeps the whole reply, so
               ``GET /chat/{id}`` shows what the stream left out.
``fetch``      ``code=N`` (400-599, default 500) ``gets=K``: the first K ``GET /chat/{id}`` of
               this call's chat answer status N (default: every one); the stream is untouched.
=============  ===========================================================================

``after`` defaults to 1 and is clamped to the reply's delta count, so ``after=999`` means
"after the last delta, before the stream ends". ``stall`` defaults to ``seconds=5``.
``times=K`` arms the fault only for the first K calls carrying the same ``X-Request-Id`` header
(without one: the same input), so "fails twice, then works" is ``times=2``. Default: always.

Server-wide rule (``--fault``)::

    [assistant=ID][,input=TEXT]:SPEC

``assistant=`` matches the request's ``assistantId`` exactly, ``input=`` matches when the raw
input contains TEXT (no ``:``, ``,`` or spaces; use ``POST /_sim/faults`` for anything fancier).
Without matchers a rule hits every call.
Example: ``assistant=sim-429:status code=429 retry_after=1``.
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import ClassVar

from worker.simulator.errors import SpecError

MALFORMED_LINES = ("json", "nofield", "nodelta", "utf8")
_RULE_KEYS = frozenset(("kind", "params", "match_assistant_id", "match_input_contains", "times"))
_MATCHERS_RE = re.compile(r"^(?:assistant|input)=[^:,\s]*(?:,(?:assistant|input)=[^:,\s]*)*$")


@dataclass(frozen=True)
class StatusFault:
    """Answer with an HTTP error instead of a chat."""

    kind: ClassVar[str] = "status"
    code: int = 500
    retry_after: str | None = None
    retry_after_in_s: float | None = None
    message: str | None = None


@dataclass(frozen=True)
class RawStatusFault:
    """Answer with a bare status line carrying ``code``, however meaningless, then close."""

    kind: ClassVar[str] = "rawstatus"
    code: int = 999


@dataclass(frozen=True)
class ResetFault:
    """Reset the connection before any response byte is sent."""

    kind: ClassVar[str] = "reset"


@dataclass(frozen=True)
class StallFault:
    """Pause the stream after ``after`` deltas for ``seconds``."""

    kind: ClassVar[str] = "stall"
    after: int = 1
    seconds: float = 5.0


@dataclass(frozen=True)
class DisconnectFault:
    """Close the connection after ``after`` deltas, leaving the chunked body unterminated."""

    kind: ClassVar[str] = "disconnect"
    after: int = 1


@dataclass(frozen=True)
class MalformedFault:
    """Send one malformed SSE line of kind ``line`` after ``after`` deltas."""

    kind: ClassVar[str] = "malformed"
    after: int = 1
    line: str = "json"


@dataclass(frozen=True)
class TruncateFault:
    """End the stream cleanly after ``after`` deltas; the stored chat keeps the whole reply."""

    kind: ClassVar[str] = "truncate"
    after: int = 1


@dataclass(frozen=True)
class FetchFault:
    """Answer the first ``gets`` ``GET /chat/{id}`` of the chat with ``code`` (None: every one)."""

    kind: ClassVar[str] = "fetch"
    code: int = 500
    gets: int | None = None


BeforeResponseFault = StatusFault | RawStatusFault | ResetFault
InStreamFault = StallFault | DisconnectFault | MalformedFault | TruncateFault
Fault = BeforeResponseFault | InStreamFault | FetchFault


class _Params:
    """Reads typed parameters off a ``key -> text`` map and rejects the ones nobody asked for."""

    def __init__(self, kind: str, params: Mapping[str, str]) -> None:
        self._kind = kind
        self._left = dict(params)

    def has(self, key: str) -> bool:
        return key in self._left

    def text(self, key: str) -> str | None:
        return self._left.pop(key, None)

    def number(self, key: str, default: float, *, minimum: float = 0) -> float:
        raw = self.text(key)
        try:
            value = default if raw is None else float(raw)
        except ValueError:
            raise SpecError(f"{self._kind}: {key}={raw!r} is not a number") from None
        if value < minimum:
            raise SpecError(f"{self._kind}: {key} must be >= {minimum:g}, got {raw}")
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int = 10**9) -> int:
        value = self.number(key, default, minimum=minimum)
        if value != int(value) or value > maximum:
            raise SpecError(f"{self._kind}: {key} must be a whole number <= {maximum}")
        return int(value)

    def finish(self) -> None:
        if self._left:
            raise SpecError(f"{self._kind}: unknown parameter(s) {', '.join(sorted(self._left))}")


def _status(p: _Params) -> StatusFault:
    retry_after = p.text("retry_after")
    if retry_after is not None and not _is_retry_after(retry_after):
        raise SpecError(f"status: retry_after={retry_after!r} is neither seconds nor an HTTP-date")
    retry_after_in = p.text("retry_after_in")
    return StatusFault(
        code=p.integer("code", 500, minimum=400, maximum=599),
        retry_after=retry_after,
        retry_after_in_s=None if retry_after_in is None else _seconds(retry_after_in),
        message=p.text("message"),
    )


def _raw_status(p: _Params) -> RawStatusFault:
    return RawStatusFault(code=p.integer("code", 999, minimum=0, maximum=999))


def _reset(p: _Params) -> ResetFault:
    return ResetFault()


def _stall(p: _Params) -> StallFault:
    return StallFault(after=p.integer("after", 1), seconds=p.number("seconds", 5.0))


def _disconnect(p: _Params) -> DisconnectFault:
    return DisconnectFault(after=p.integer("after", 1))


def _malformed(p: _Params) -> MalformedFault:
    line = p.text("line") or "json"
    if line not in MALFORMED_LINES:
        raise SpecError(f"malformed: line={line!r}, expected one of {', '.join(MALFORMED_LINES)}")
    return MalformedFault(after=p.integer("after", 1), line=line)


def _truncate(p: _Params) -> TruncateFault:
    return TruncateFault(after=p.integer("after", 1))


def _fetch(p: _Params) -> FetchFault:
    return FetchFault(
        code=p.integer("code", 500, minimum=400, maximum=599),
        gets=p.integer("gets", 0) if p.has("gets") else None,
    )


_BUILDERS: dict[str, Callable[[_Params], Fault]] = {
    "status": _status,
    "rawstatus": _raw_status,
    "reset": _reset,
    "stall": _stall,
    "disconnect": _disconnect,
    "malformed": _malformed,
    "truncate": _truncate,
    "fetch": _fetch,
}
FAULT_KINDS = tuple(_BUILDERS)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SpecError(f"status: retry_after_in={raw!r} is not a number of seconds") from None
    if value < 0:
        raise SpecError("status: retry_after_in must be >= 0")
    return value


def _is_retry_after(raw: str) -> bool:
    if raw.isdigit():
        return True
    try:
        parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return False
    return True


def build_fault(kind: str, params: Mapping[str, str]) -> Fault:
    """Turn a kind and its text parameters into a typed fault, or raise ``SpecError``."""
    builder = _BUILDERS.get(kind)
    if builder is None:
        raise SpecError(f"unknown fault kind {kind!r}, expected one of {', '.join(FAULT_KINDS)}")
    reader = _Params(kind, params)
    fault = builder(reader)
    reader.finish()
    return fault


@dataclass
class FaultRule:
    """A fault plus when it applies: which assistant, which input, how many times per request.

    ``params`` are the spec's text parameters (JSON numbers are accepted and turned into text);
    the rule is validated when built, so a bad rule fails at startup, not on the first call.
    """

    kind: str
    params: dict[str, str] = field(default_factory=dict)
    match_assistant_id: str | None = None
    match_input_contains: str | None = None
    times: int | None = None
    fault: Fault = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.params = {str(k): str(v) for k, v in self.params.items()}
        if self.times is not None and (not isinstance(self.times, int) or self.times < 0):
            raise SpecError(f"{self.kind}: times must be a whole number >= 0")
        self.fault = build_fault(self.kind, self.params)

    @property
    def identity(self) -> str:
        """A stable name for counting ``times`` per request; equal rules share their count."""
        params = " ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.kind} {params}|{self.match_assistant_id}|{self.match_input_contains}"

    def matches(self, assistant_id: str | None, input_text: str) -> bool:
        """Whether this rule applies to a call for ``assistant_id`` whose raw input is given."""
        if self.match_assistant_id is not None and self.match_assistant_id != assistant_id:
            return False
        return self.match_input_contains is None or self.match_input_contains in input_text

    def to_json(self) -> dict[str, object]:
        """The rule as ``POST /_sim/faults`` accepts it back."""
        return {
            "kind": self.kind,
            "params": dict(self.params),
            "match_assistant_id": self.match_assistant_id,
            "match_input_contains": self.match_input_contains,
            "times": self.times,
        }

    @classmethod
    def from_json(cls, data: object) -> FaultRule:
        """Build a rule from ``{"rule": "<text>"}`` or the shape ``to_json`` produces."""
        if not isinstance(data, dict):
            raise SpecError("a fault rule must be a JSON object")
        if "rule" in data:
            return parse_fault_rule(str(data["rule"]))
        unknown = set(data) - _RULE_KEYS
        if unknown or not isinstance(data.get("kind"), str):
            raise SpecError(f"a fault rule needs a string 'kind'; unknown keys: {sorted(unknown)}")
        params = data.get("params")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise SpecError("'params' must be an object")
        return cls(
            kind=data["kind"],
            params=params,
            match_assistant_id=data.get("match_assistant_id"),
            match_input_contains=data.get("match_input_contains"),
            times=data.get("times"),
        )


def parse_params(words: Iterable[str], *, where: str) -> dict[str, str]:
    """Split ``key=value`` words into a map; ``where`` names the spec in error messages."""
    params: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise SpecError(f"{where}: expected key=value, got {word!r}")
        params[key] = value
    return params


def parse_fault_spec(spec: str) -> FaultRule:
    """Parse ``KIND [key=value ...] [times=K]`` into a rule that matches every call."""
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise SpecError(f"fault {spec!r}: {exc}") from None
    if not words:
        raise SpecError("empty fault spec")
    kind, *rest = words
    params = parse_params(rest, where=kind)
    times = params.pop("times", None)
    if times is not None and not times.isdigit():
        raise SpecError(f"{kind}: times={times!r} must be a whole number")
    return FaultRule(kind=kind, params=params, times=None if times is None else int(times))


def parse_fault_rule(text: str) -> FaultRule:
    """Parse ``[assistant=ID][,input=TEXT]:SPEC`` (the ``--fault`` syntax) into a rule."""
    head, sep, tail = text.partition(":")
    if not sep or not _MATCHERS_RE.match(head):
        return parse_fault_spec(text)
    rule = parse_fault_spec(tail)
    matchers = parse_params(head.split(","), where="matchers")
    rule.match_assistant_id = matchers.get("assistant") or None
    rule.match_input_contains = matchers.get("input") or None
    return rule


@dataclass(frozen=True)
class FaultPlan:
    """What to do to one call: refuse it up front, or disturb its stream and the chat's fetches
    (or neither)."""

    before_response: BeforeResponseFault | None = None
    in_stream: tuple[InStreamFault, ...] = ()
    on_fetch: tuple[FetchFault, ...] = ()

    @property
    def kinds(self) -> str | None:
        """The applied fault kinds for the call record, comma-joined; ``None`` when clean."""
        if self.before_response is not None:
            return self.before_response.kind
        return ",".join(f.kind for f in (*self.in_stream, *self.on_fetch)) or None


def plan_faults(armed: Sequence[Fault]) -> FaultPlan:
    """The first up-front fault wins over everything; otherwise all stream and fetch faults
    apply."""
    for fault in armed:
        if isinstance(fault, BeforeResponseFault):
            return FaultPlan(before_response=fault)
    in_stream = tuple(f for f in armed if isinstance(f, InStreamFault))
    on_fetch = tuple(f for f in armed if isinstance(f, FetchFault))
    return FaultPlan(in_stream=in_stream, on_fetch=on_fetch)


class FaultBook:
    """Server-wide rules plus the per-request counts that make ``times=K`` work."""

    def __init__(self, rules: Iterable[FaultRule] = ()) -> None:
        self.rules: list[FaultRule] = list(rules)
        self._armed: Counter[tuple[str, str]] = Counter()

    def add(self, rule: FaultRule) -> None:
        """Add a server-wide rule at runtime."""
        self.rules.append(rule)

    def clear(self) -> None:
        """Forget every rule and every count."""
        self.rules.clear()
        self._armed.clear()

    def arm(
        self,
        directives: Sequence[FaultRule],
        *,
        call_key: str,
        assistant_id: str | None,
        input_text: str,
    ) -> FaultPlan:
        """Pick the faults for one call: its own directives first, then matching rules."""
        candidates = [*directives, *(r for r in self.rules if r.matches(assistant_id, input_text))]
        return plan_faults([r.fault for r in candidates if self._take(r, call_key)])

    def _take(self, rule: FaultRule, call_key: str) -> bool:
        if rule.times is None:
            return True
        key = (rule.identity, call_key)
        if self._armed[key] >= rule.times:
            return False
        self._armed[key] += 1
        return True
