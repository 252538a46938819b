"""Pure: what one server-sent event from Vapi's ``POST /chat`` stream means.

Vapi streams ``CreateChatStreamResponse`` objects, one per event::

    data: {"id": "<chat id>", "sessionId": "<session id>", "path": "chat.output[0].content",
           "delta": "Hel"}

``parse_event`` turns each event into one of:

* ``StreamDelta``   a fragment of reply text (``path`` is ``chat.output[N].content``);
* ``StreamDone``    ``data: [DONE]``, which some OpenAI-style servers send before closing;
* ``MalformedEvent`` data that is not Vapi's shape (the client counts and skips these);
* ``None``          nothing to act on: empty data (keep-alive, ``id:``/``retry:``-only events) or a
  well-formed event for another path.

Only ``chat.output[N].content`` paths are reply text. Vapi addresses each streamed fragment by its
place in the final ``Chat`` object, and other paths (a tool call's arguments, a message's role or
name, fields added later) are not words the user should see; appending them would corrupt the text.
The SSE ``event:`` name is not consulted: Vapi sends none, and the data alone says what it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import pydantic_core

from worker.vapi.sse import ServerSentEvent

__all__ = ["MalformedEvent", "StreamDelta", "StreamDone", "StreamEvent", "parse_event"]

DONE_MARKER: Final = "[DONE]"
_TEXT_PATH: Final = re.compile(r"chat\.output\[\d+\]\.content")


# Not frozen: one is built per delta, and a frozen dataclass's __init__ sets every field through
# ``object.__setattr__``, a slower path (``bench/README.md``).
@dataclass(slots=True)
class StreamDelta:
    """A fragment of reply text; ``chat_id`` is what the next turn sends as ``previousChatId``."""

    chat_id: str
    path: str
    delta: str
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class StreamDone:
    """The server said the stream is complete (``data: [DONE]``)."""


@dataclass(frozen=True, slots=True)
class MalformedEvent:
    """An event whose data is not Vapi's; ``reason`` is a short fixed code for metrics."""

    reason: str


StreamEvent = StreamDelta | StreamDone | MalformedEvent

_DONE: Final = StreamDone()
# One instance per reason: malformed events are counted, not inspected, so they need not allocate.
_NOT_JSON: Final = MalformedEvent("not_json")
_NOT_OBJECT: Final = MalformedEvent("not_object")
_NO_ID: Final = MalformedEvent("missing_id")
_NO_PATH: Final = MalformedEvent("missing_path")
_NO_DELTA: Final = MalformedEvent("missing_delta")

#: Every ``MalformedEvent.reason`` that ``parse_event`` produces.
MALFORMED_REASONS: Final[frozenset[str]] = frozenset(
    event.reason for event in (_NOT_JSON, _NOT_OBJECT, _NO_ID, _NO_PATH, _NO_DELTA)
)


def parse_event(sse: ServerSentEvent) -> StreamEvent | None:
    """Interpret one server-sent event from a Vapi chat stream."""
    data = sse.data
    if not data or data.isspace():
        return None
    if data == DONE_MARKER or data.strip() == DONE_MARKER:
        return _DONE
    try:
        # pydantic-core's parser: faster than json.loads on these small objects, and it refuses
        # unpaired surrogate escapes, which could not be re-encoded as UTF-8 when published.
        document = pydantic_core.from_json(data, allow_inf_nan=False)
    except ValueError:
        return _NOT_JSON
    if not isinstance(document, dict):
        return _NOT_OBJECT
    return _from_object(document)


def _from_object(document: dict[str, object]) -> StreamEvent | None:
    chat_id = document.get("id")
    if not isinstance(chat_id, str) or not chat_id:
        return _NO_ID
    path = document.get("path")
    if not isinstance(path, str):
        return _NO_PATH
    if not _is_text_path(path):
        # Checked before ``delta``: another path's delta may rightly be a number or an object.
        return None
    delta = document.get("delta")
    if not isinstance(delta, str):
        return _NO_DELTA
    session_id = document.get("sessionId")
    return StreamDelta(
        chat_id=chat_id,
        path=path,
        delta=delta,
        session_id=session_id if isinstance(session_id, str) else None,
    )


@lru_cache(maxsize=256)
def _is_text_path(path: str) -> bool:
    # A stream repeats one or two paths hundreds of times: cache the answer, not the regex work.
    return _TEXT_PATH.fullmatch(path) is not None
