"""After a stream ends: fetch its chat from Vapi, for what the reply cost and whether it is whole.

Why: Vapi's ``/chat`` stream has no end event, so a connection a proxy closed early looks exactly
like a finished reply; and the stream says nothing of what the reply cost. The chat Vapi stored
(``GET /chat/{id}``) says both. The check never fails a request: a fetch that fails is tried
again, within the request's deadline and at most ``len(RETRY_DELAYS_S) + 1`` times, then the
response goes out unchecked (``cost`` and ``stream_complete`` null) (docs/design.md §11).

Each try is bounded by ``fetch_timeout_s`` (``VAPI_FIRST_DELTA_TIMEOUT_S``: the time Vapi gets to
start answering a call), and by what is left of the request's deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from worker.errors import VapiError
from worker.metrics import WorkerMetrics
from worker.vapi.chat import ReplyCost, read_chat, stream_complete

log = structlog.get_logger(__name__)

#: Pauses between tries of one fetch, in seconds.
RETRY_DELAYS_S: Final = (0.2, 0.5, 1.0, 2.0)


class ChatFetcher(Protocol):
    """What the check needs of a Vapi client (``worker.vapi.client.VapiClient``)."""

    async def fetch_chat(self, chat_id: str, *, request_id: str, timeout_s: float) -> object: ...


@dataclass(frozen=True, slots=True)
class ReplyCheck:
    """What the chat said: the cost, whether the stream was whole, and Vapi's text if not.

    ``stream_complete`` None: not known (the chat could not be fetched, or had no output).
    ``vapi_text`` is set only when the stream was not complete.
    """

    cost: ReplyCost | None = None
    stream_complete: bool | None = None
    vapi_text: str | None = None


#: The check of a reply whose chat was not (or could not be) fetched.
UNCHECKED: Final = ReplyCheck()


def check_against(streamed: str, chat: object) -> ReplyCheck:
    """Pure: the check of ``streamed`` text against a fetched ``Chat`` document."""
    reading = read_chat(chat)
    complete = stream_complete(streamed, reading.output_text)
    return ReplyCheck(
        cost=reading.cost,
        stream_complete=complete,
        vapi_text=reading.output_text if complete is False else None,
    )


class ReplyChecker:
    """Fetches a finished stream's chat and compares; counts spend, tokens and results."""

    def __init__(
        self,
        fetcher: ChatFetcher,
        metrics: WorkerMetrics,
        *,
        fetch_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        delays_s: tuple[float, ...] = RETRY_DELAYS_S,
    ) -> None:
        self._fetcher = fetcher
        self._metrics = metrics
        self._fetch_timeout_s = fetch_timeout_s
        self._clock = clock
        self._sleep = sleep
        self._delays_s = delays_s

    async def check(
        self, chat_id: str, streamed: str, *, request_id: str, deadline: float
    ) -> ReplyCheck:
        """The check of ``streamed`` against chat ``chat_id``; ``UNCHECKED`` if it cannot be had
        by ``deadline`` (on ``clock``)."""
        chat = await self._fetch(chat_id, request_id=request_id, deadline=deadline)
        result = UNCHECKED if chat is None else check_against(streamed, chat)
        self._count(result)
        if result.stream_complete is False:
            log.warning(
                "the stream ended before the reply did; the response carries Vapi's text",
                chat_id=chat_id,
                streamed_chars=len(streamed),
                vapi_chars=len(result.vapi_text or ""),
            )
        return result

    async def _fetch(self, chat_id: str, *, request_id: str, deadline: float) -> object | None:
        tries = len(self._delays_s) + 1
        for number in range(tries):
            left = deadline - self._clock()
            if left <= 0:
                break
            try:
                return await self._fetcher.fetch_chat(
                    chat_id, request_id=request_id, timeout_s=min(self._fetch_timeout_s, left)
                )
            except VapiError as err:
                delay = self._delays_s[number] if number < len(self._delays_s) else None
                last = delay is None or self._clock() + delay >= deadline
                log.warning(
                    "fetching the chat failed",
                    chat_id=chat_id,
                    error=err.code,
                    message=str(err),
                    http_status=err.http_status,
                    try_number=number + 1,
                    giving_up=last,
                )
                if last or delay is None:
                    break
                await self._sleep(delay)
        return None

    def _count(self, result: ReplyCheck) -> None:
        if result.stream_complete is None:
            outcome = "unchecked"
        else:
            outcome = "complete" if result.stream_complete else "incomplete"
        self._metrics.reply_checks_total.labels(result=outcome).inc()
        cost = result.cost
        if cost is not None:
            self._metrics.cost_usd_total.inc(cost.usd)
            self._metrics.tokens_total.labels(kind="prompt").inc(cost.prompt_tokens)
            self._metrics.tokens_total.labels(kind="completion").inc(cost.completion_tokens)
