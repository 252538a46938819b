"""Pure, incremental Server-Sent Events framing: bytes in, ``ServerSentEvent``s out, no network.

The framing itself is httpx-sse's, not ours: ``SSELineDecoder`` splits lines on CR, LF and CRLF
(also when a CRLF is split between chunks) and ``SSEDecoder`` applies the WHATWG field rules
(``data:`` joining, ``event:``, ``id:``, ``retry:``, ``:`` comments). Those are private modules of
httpx-sse, so the version is pinned (``<0.5``) and ``tests/unit/test_sse.py`` runs httpx-sse's own
cases against this class. What this module adds is what httpx-sse leaves to httpx's ``aiter_text``:

* an incremental UTF-8 decoder, so a character split between network chunks is joined, and bytes
  that are not UTF-8 raise ``VapiProtocolError`` instead of being silently replaced;
* a leading byte-order mark is dropped, as the SSE specification asks;
* a bound on the size of one event (its lines so far, and the unterminated line), so a server that
  never ends a line or an event cannot grow memory without limit.

At end of stream (``close``), a pending event that was not terminated by a blank line is discarded,
as the specification says (httpx-sse does the same).
"""

from __future__ import annotations

import codecs
from typing import Final

from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from worker.errors import VapiProtocolError

__all__ = ["DEFAULT_MAX_EVENT_CHARS", "SSEStreamDecoder", "ServerSentEvent"]

#: Most characters one event may take before its terminating blank line (a Vapi event is ~100).
DEFAULT_MAX_EVENT_CHARS: Final = 1_048_576

# "utf-8-sig" is UTF-8 that drops one leading BOM, also when the BOM's bytes arrive split.
_Utf8Decoder: Final = codecs.getincrementaldecoder("utf-8-sig")


class SSEStreamDecoder:
    """Turns a byte stream, in chunks of any size, into complete server-sent events."""

    __slots__ = (
        "_decoded_any",
        "_error",
        "_event_chars",
        "_events",
        "_line_chars",
        "_lines",
        "_max_event_chars",
        "_text",
    )

    def __init__(self, *, max_event_chars: int = DEFAULT_MAX_EVENT_CHARS) -> None:
        self._text = _Utf8Decoder(errors="strict")
        self._lines = SSELineDecoder()
        self._events = SSEDecoder()
        self._max_event_chars = max_event_chars
        self._event_chars = 0  # in complete lines of the event being read
        self._line_chars = 0  # in the unterminated line held by the line decoder
        self._decoded_any = False
        #: Raised by the next call once bytes that are not UTF-8 were met.
        self._error: VapiProtocolError | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode one chunk; return the events it completed (often none or one).

        Bytes that are not UTF-8 raise ``VapiProtocolError``; events completed before them in
        the same chunk are returned first, and the error is raised by the next call.
        """
        if self._error is not None:
            raise self._error
        try:
            text = self._text.decode(chunk)
        except UnicodeDecodeError as exc:
            text = self._valid_prefix(exc)
        events = self._events_in(text) if text else []
        if self._error is not None and not events:
            raise self._error
        return events

    def _events_in(self, text: str) -> list[ServerSentEvent]:
        self._decoded_any = True
        lines = self._lines.decode(text)
        if lines:
            # The line decoder now holds at most the one fragment after the last line break.
            pending = self._lines.buffer
            self._line_chars = len(pending[0]) if pending else 0
        else:
            self._line_chars += len(text)
        events = self._dispatch(lines)
        if self._event_chars + self._line_chars > self._max_event_chars:
            raise VapiProtocolError(
                f"an event in the stream exceeds {self._max_event_chars} characters"
            )
        return events

    def _valid_prefix(self, exc: UnicodeDecodeError) -> str:
        """The text before the first bad byte; remembers the error for the next call."""
        error = VapiProtocolError(f"the event stream is not valid UTF-8: {exc.reason}")
        error.__cause__ = exc
        self._error = error
        # ``exc.object`` is what the decoder held plus this chunk; up to ``start`` it is valid.
        prefix = exc.object[: exc.start].decode("utf-8")
        return prefix.removeprefix("\ufeff") if not self._decoded_any else prefix

    def close(self) -> list[ServerSentEvent]:
        """End of stream: return events completed by the last bytes; drop an unterminated one."""
        if self._error is not None:
            raise self._error
        try:
            text = self._text.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise VapiProtocolError(
                f"the event stream ends inside a UTF-8 character: {exc.reason}"
            ) from exc
        lines = self._lines.decode(text) if text else []
        lines.extend(self._lines.flush())
        return self._dispatch(lines)

    def _dispatch(self, lines: list[str]) -> list[ServerSentEvent]:
        events = []
        for line in lines:
            # Comments are not part of any event; a blank line ends one.
            if not line:
                self._event_chars = 0
            elif line[0] != ":":
                self._event_chars += len(line)
            event = self._events.decode(line)
            if event is not None:
                events.append(event)
        return events
