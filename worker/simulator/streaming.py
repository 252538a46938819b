"""Writing one reply as Vapi's SSE stream, paced, with the in-stream faults of the call.

Why: timing is the point of a streaming test (first delta, gaps, stalls), so each event is written
and drained right when it is due, and the stream's bookkeeping (deltas sent, streams in flight,
delta timestamps) is updated where the bytes are written. Events that are due at once (no delay
between tokens: "as fast as it can") go out together, up to ``FLAT_OUT_WRITE_BYTES`` per write:
the bytes on the wire are the same, and the simulator, which shares the benchmark's cores with the
worker, pays for one write and one event-loop turn per write instead of per event
(``bench/README.md``).
A stream ends by closing the chunked body; ``disconnect`` instead drops the connection so the
final chunk never arrives, and ``truncate`` closes the body cleanly before the last delta (the
chat, complete, is stored all the same).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from worker.simulator.events import DONE_EVENT, delta_event, malformed_event
from worker.simulator.faults import (
    DisconnectFault,
    InStreamFault,
    MalformedFault,
    StallFault,
    TruncateFault,
)
from worker.simulator.state import CallRecord, SimulatorState

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
#: Events due at the same moment are joined into writes of about this size (a few TCP segments).
FLAT_OUT_WRITE_BYTES = 4096


@dataclass(frozen=True)
class StreamPlan:
    """What one stream will send, and when."""

    chat_id: str
    session_id: str | None
    tokens: list[str]
    first_delay_s: float
    delay_s: float
    faults: tuple[InStreamFault, ...] = ()
    done_marker: bool = False
    record_times: bool = False


class _HeldEvents:
    """Delta events due but not yet written; counted as sent once their write is done."""

    __slots__ = ("count", "data")

    def __init__(self) -> None:
        self.data = bytearray()
        self.count = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def add(self, event: bytes) -> None:
        self.data += event
        self.count += 1

    def take(self) -> tuple[bytes, int]:
        taken = (bytes(self.data), self.count)
        self.data.clear()
        self.count = 0
        return taken


class ReplyStream:
    """Sends one planned reply over one HTTP response."""

    def __init__(
        self, request: web.Request, plan: StreamPlan, call: CallRecord, state: SimulatorState
    ) -> None:
        self._request = request
        self._plan = plan
        self._call = call
        self._state = state
        self._response = web.StreamResponse(status=200, headers=SSE_HEADERS)

    async def send(self, on_complete: Callable[[], None]) -> web.StreamResponse:
        """Stream the reply; ``on_complete`` runs once every delta is out, before the end."""
        await self._response.prepare(self._request)
        self._call.status = 200
        self._state.stats.stream_opened()
        try:
            await self._send_all(on_complete)
        except ConnectionError:
            self._call.outcome = "client_closed"
        finally:
            self._state.stats.stream_closed()
        return self._response

    async def _send_all(self, on_complete: Callable[[], None]) -> None:
        plan, held = self._plan, _HeldEvents()
        for index, token in enumerate(plan.tokens):
            delay = plan.first_delay_s if index == 0 else plan.delay_s
            faults = self._faults_due(index)
            if delay > 0 or held.size >= FLAT_OUT_WRITE_BYTES or faults:
                await self._flush(held)
                if await self._disturb(faults, on_complete):
                    return
                # A zero delay still yields, once per write, so flat-out streams take turns.
                await asyncio.sleep(delay)
            held.add(self._delta_event(token))
        await self._flush(held)
        if await self._disturb(self._faults_due(len(plan.tokens)), on_complete):
            return
        on_complete()
        if plan.done_marker:
            await self._write(DONE_EVENT)
        await self._response.write_eof()
        self._call.outcome = "completed"

    def _delta_event(self, token: str) -> bytes:
        plan = self._plan
        if plan.record_times:
            self._state.delta_times.setdefault(plan.chat_id, []).append(time.time())
        return delta_event(plan.chat_id, token, plan.session_id)

    async def _flush(self, held: _HeldEvents) -> None:
        if held.count:
            data, count = held.take()
            await self._write(data)
            self._call.deltas_sent += count

    async def _write(self, data: bytes) -> None:
        await self._response.write(data)
        await self._request.writer.drain()

    def _faults_due(self, position: int) -> list[InStreamFault]:
        """The faults to apply after ``position`` deltas (``after`` is clamped to the last)."""
        last = len(self._plan.tokens)
        return [fault for fault in self._plan.faults if min(fault.after, last) == position]

    async def _disturb(self, faults: list[InStreamFault], on_complete: Callable[[], None]) -> bool:
        """Apply ``faults`` in order; True when the stream ended early (dropped or truncated)."""
        for fault in faults:
            if isinstance(fault, StallFault):
                await asyncio.sleep(fault.seconds)
            elif isinstance(fault, MalformedFault):
                await self._write(malformed_event(fault.line, self._plan.chat_id))
            elif isinstance(fault, DisconnectFault):
                self._drop_connection()
                return True
            elif isinstance(fault, TruncateFault):
                # Vapi finished the chat; only the stream to the client ends early, cleanly.
                on_complete()
                await self._response.write_eof()
                self._call.outcome = "truncated"
                return True
        return False

    def _drop_connection(self) -> None:
        """Close after flushing what was sent, without the chunked body's terminating chunk."""
        self._call.outcome = "disconnected"
        transport = self._request.transport
        if transport is not None:
            transport.close()
