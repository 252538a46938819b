"""Delta stream folding: the records of the output topics in, typed events out. No I/O.

The rules for reading the worker's output correctly live here and nowhere else:

* A delta is a duplicate when its ``(request_id, attempt, chat_id, seq)`` was seen before; it is
  dropped (at least once delivery repeats records).
* One stream is one ``(request_id, attempt, chat_id)``. A delta of a stream not seen before for
  its request, after another stream of that request, is a restart: a ``Restart`` event comes
  before its ``Delta``, and the earlier stream's text is void. A retry starts a new ``attempt``;
  a run after a worker crash or rebalance counts attempts from 1 again on a new ``chat_id``.
* A delta of a stream that was already replaced is void and dropped, whatever its ``seq``.
* The final response's ``chat_id`` names the stream that is the answer. When the stream shown
  last is another one, a ``Restart`` comes before the ``Response``: the text shown is void and the
  response's ``text`` is the answer. The last response per ``request_id`` is the answer (the
  worker may publish a second one in a narrow window after a crash); a later run's stream after
  a response is a restart too.

``StreamFolder`` remembers at most ``max_requests`` requests, least recently used first out: a
duplicate that arrives after that many other requests is not recognised.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from vapi_stream_client.events import Delta, Event, Response, Restart
from vapi_stream_client.messages import ChatDelta, ChatResponse

#: How many requests a folder remembers by default (their streams and the seqs seen).
DEFAULT_MAX_REQUESTS: Final = 10_000

_Stream = tuple[int, str]  # (attempt, chat_id)


@dataclass
class _RequestStreams:
    current: _Stream | None = None
    seen: dict[_Stream, set[int]] = field(default_factory=dict)


class StreamFolder:
    """Folds delta and response records into events, applying the module's rules."""

    def __init__(self, *, max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        self._max_requests = max_requests
        self._requests: OrderedDict[str, _RequestStreams] = OrderedDict()

    def on_delta(self, delta: ChatDelta) -> list[Event]:
        """The events one delta record makes: none (a duplicate or a void stream's), its
        ``Delta``, or a ``Restart`` and its ``Delta``."""
        streams = self._streams(delta.request_id)
        stream = (delta.attempt, delta.chat_id)
        seqs = streams.seen.get(stream)
        if seqs is not None and stream != streams.current:
            return []  # a replaced stream's text is void
        if seqs is not None and delta.seq in seqs:
            return []  # a redelivered delta
        events: list[Event] = []
        if seqs is None:
            if streams.current is not None:
                events.append(
                    Restart(
                        delta.request_id,
                        delta.conversation_id,
                        delta.attempt,
                        delta.chat_id,
                        "new_stream",
                    )
                )
            seqs = streams.seen[stream] = set()
            streams.current = stream
        seqs.add(delta.seq)
        events.append(Delta(delta))
        return events

    def on_response(self, response: ChatResponse) -> list[Event]:
        """The events one response record makes: its ``Response``, after a ``Restart`` when the
        stream shown is not the one the response names."""
        streams = self._streams(response.request_id)
        events: list[Event] = []
        current = streams.current
        answer = response.chat_id
        if (
            response.status == "completed"
            and answer is not None
            and current is not None
            and current[1] != answer
        ):
            events.append(
                Restart(
                    response.request_id,
                    response.conversation_id,
                    None,
                    answer,
                    "answer_is_another_stream",
                )
            )
        events.append(Response(response))
        return events

    def _streams(self, request_id: str) -> _RequestStreams:
        streams = self._requests.get(request_id)
        if streams is None:
            streams = self._requests[request_id] = _RequestStreams()
            if len(self._requests) > self._max_requests:
                self._requests.popitem(last=False)
        else:
            self._requests.move_to_end(request_id)
        return streams
