"""The only httpx code in the worker: one streaming ``POST /chat`` call, as a stream of deltas,
and ``GET /chat/{id}``, the chat it made (``fetch_chat``).

    async with VapiClient(base_url, api_key, timeouts) as vapi:
        async with contextlib.aclosing(vapi.stream_chat(body, request_id=rid, attempt=1)) as deltas:
            async for delta in deltas:
                ...

What goes wrong is mapped here, once, to ``worker.errors`` (``raise ... from exc``):

    ============================================  =================================================
    401 / 403                                      VapiAuthError
    429                                            VapiRateLimitedError (``retry_after_s`` parsed)
    a status outside 100-599 (a broken proxy)      VapiProtocolError
    any other non-2xx                              VapiStatusError (the body's message, truncated)
    2xx that is not ``text/event-stream``          VapiProtocolError
    connect timeout                                VapiTimeoutError(phase="connect")
    refused / reset / closed before the headers    VapiConnectError
    reset / closed / truncated after the headers   VapiStreamBrokenError
    undecodable bytes (not UTF-8, bad encoding)    VapiProtocolError
    no delta within ``first_delta_s`` of the call  VapiTimeoutError(phase="first_delta")
    no next delta within ``stall_s``               VapiTimeoutError(phase="stall")
    whole call longer than ``request_s``           VapiTimeoutError(phase="request")
    ============================================  =================================================

Deadlines are kept by one lazy timer per call (``_Watchdog``): a delta only moves a number, and the
timer, when it fires early, re-arms itself at the moved deadline. So the per-delta path allocates no
timer, unlike wrapping every read in ``asyncio.timeout``. The stall clock runs only while this
generator waits for Vapi, not while the caller handles a delta (publishing it to Kafka), so a slow
consumer is never mistaken for a stalled Vapi; the whole-request deadline counts both.

``fetch_chat`` maps its failures the same way (statuses, connect errors; a body cut short is a
VapiConnectError, a body that is not a JSON object a VapiProtocolError), and is bounded as a whole
by the ``timeout_s`` it is given: VapiTimeoutError(phase="fetch").

Cancellation: if the consuming task is cancelled while waiting here, the response is closed on the
way out, and a body not read to its end closes its connection (``worker.vapi.transport``). If it
is cancelled elsewhere, the generator is closed by ``aclosing`` (use it: an abandoned async
generator is only closed when garbage-collected).

The API key lives in the ``Authorization`` default header (httpx masks it in reprs); it, and every
other secret passed as ``scrub``, is scrubbed from any server text that ends up in an exception
message (and so in a failed response).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from types import TracebackType
from typing import Final, Self, cast
from urllib.parse import quote

import httpx
import pydantic_core
from pydantic import SecretStr

from worker.config import setting_default
from worker.errors import (
    ConfigError,
    VapiAuthError,
    VapiConnectError,
    VapiProtocolError,
    VapiRateLimitedError,
    VapiStatusError,
    VapiStreamBrokenError,
    VapiTimeoutError,
)
from worker.retry import parse_retry_after
from worker.vapi.events import MalformedEvent, StreamDelta, StreamDone, parse_event
from worker.vapi.sse import SSEStreamDecoder
from worker.vapi.transport import VapiTransport

__all__ = ["VapiClient", "VapiTimeouts"]

#: How much of an error response is read, and how much of its message is kept.
MAX_ERROR_BODY_BYTES: Final = 8192
MAX_ERROR_MESSAGE_CHARS: Final = 300
USER_AGENT: Final = "vapi-stream-worker"
#: The statuses HTTP defines (RFC 9110 section 15); anything else is not an HTTP answer.
MIN_HTTP_STATUS: Final = 100
MAX_HTTP_STATUS: Final = 599
#: Largest ``Chat`` object read: it holds the whole transcript, and a conversation grows.
MAX_CHAT_BYTES: Final = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class VapiTimeouts:
    """The four deadlines of one call, in seconds (docs/design.md §6)."""

    connect_s: float
    first_delta_s: float
    stall_s: float
    request_s: float

    def __post_init__(self) -> None:
        for name in ("connect_s", "first_delta_s", "stall_s", "request_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"Vapi timeout {name} must be a positive number, got {value!r}")


class VapiClient:
    """Streams Vapi chat replies over one pooled transport (aiohttp's, by default)."""

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        timeouts: VapiTimeouts,
        *,
        max_connections: int = setting_default("vapi_max_connections"),
        transport: httpx.AsyncBaseTransport | None = None,
        on_malformed: Callable[[str], None] | None = None,
        scrub: Iterable[SecretStr] = (),
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"Vapi base URL must be http(s)://host[:port][/path], got {url}")
        self._base_url = str(url).rstrip("/")
        # Parsed once, not per call: the URL never changes.
        self._chat_url = httpx.URL(f"{self._base_url}/chat")
        self._api_key = api_key
        # The key and every other secret given (kept wrapped: no repr shows them), longest first,
        # so that one containing another is scrubbed whole.
        self._scrubbed = sorted(
            (s for s in (api_key, *scrub) if s.get_secret_value()),
            key=lambda s: len(s.get_secret_value()),
            reverse=True,
        )
        self._timeouts = timeouts
        self._on_malformed = on_malformed
        #: Malformed events skipped so far, over all calls.
        self.malformed_events = 0
        self._headers = httpx.Headers(
            {
                "Authorization": f"Bearer {api_key.get_secret_value()}",
                "Accept": "text/event-stream",
                # Compressed SSE can be held back by the compressor; deltas must flow as written.
                "Accept-Encoding": "identity",
                "Cache-Control": "no-store",
                "User-Agent": USER_AGENT,
            }
        )
        # Only connecting has an httpx timeout: reading is bounded by the watchdog, which can
        # tell a first delta from a stall, and waiting for a pooled connection counts as
        # waiting for the first delta.
        self._timeout = httpx.Timeout(
            connect=timeouts.connect_s, read=None, write=None, pool=None
        ).as_dict()
        # Requests go to the transport directly, without an ``httpx.AsyncClient`` around it:
        # none of the client's per-call work (its cookie jar, URL merging, the auth and redirect
        # flows) applies to one fixed URL with no cookies, no redirects followed and the key in a
        # default header, and it is a large share of a call's CPU (``bench/README.md``). aiohttp
        # moves the bytes, through httpx-aiohttp (``worker.vapi.transport``); the pool limit
        # lives in the transport.
        self._transport = transport or VapiTransport(max_connections=max_connections)

    def __repr__(self) -> str:
        return f"VapiClient(base_url={self._base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._transport.aclose()

    async def stream_chat(
        self, body: dict[str, object], *, request_id: str, attempt: int
    ) -> AsyncGenerator[StreamDelta, None]:
        """POST ``body`` to ``/chat`` and yield each text delta of the streamed reply, as it comes.

        Ends when the server closes the stream or sends ``[DONE]``; zero deltas is a valid (empty)
        reply. Malformed events are counted (``malformed_events``, ``on_malformed``) and skipped.
        Raises only ``VapiError`` subclasses (and ``CancelledError``). Consume it from one task.
        """
        watchdog = _Watchdog(self._timeouts)
        response: httpx.Response | None = None
        try:
            response = await self._open(body, request_id=request_id, attempt=attempt)
            async with contextlib.aclosing(self._deltas(response)) as deltas:
                async for delta in deltas:
                    watchdog.waiting = False
                    yield delta
                    watchdog.resume()
        except asyncio.CancelledError:
            watchdog.stop()
            watchdog.raise_if_expired()
            raise
        finally:
            # Timer first: closing the response must not be cut short by a late deadline.
            watchdog.stop()
            if response is not None:
                await response.aclose()

    async def fetch_chat(self, chat_id: str, *, request_id: str, timeout_s: float) -> object:
        """``GET /chat/{chat_id}``: the chat as parsed JSON (an object), within ``timeout_s``.

        Raises only ``VapiError`` subclasses (and ``CancelledError``).
        """
        request = httpx.Request(
            "GET",
            httpx.URL(f"{self._base_url}/chat/{quote(chat_id, safe='')}"),
            headers=self._headers,
            extensions={"timeout": self._timeout},
        )
        request.headers["Accept"] = "application/json"
        request.headers["X-Request-Id"] = request_id
        try:
            async with asyncio.timeout(timeout_s):
                return await self._fetch_json(request)
        except TimeoutError as exc:
            raise VapiTimeoutError(
                f"GET /chat/{{id}} took longer than {timeout_s:g}s", phase="fetch"
            ) from exc

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; a connection that fails or times out raises Vapi's error for it."""
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.TimeoutException as exc:
            raise VapiTimeoutError(
                f"connecting to Vapi took longer than {self._timeouts.connect_s:g}s",
                phase="connect",
            ) from exc
        except httpx.TransportError as exc:
            raise VapiConnectError(f"no response from Vapi: {_describe(exc)}") from exc
        response.request = request
        return response

    async def _fetch_json(self, request: httpx.Request) -> object:
        response = await self._send(request)
        try:
            status = response.status_code
            if not 200 <= status < 300:
                raise self._status_error(response, await _read_error_body(response))
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_CHAT_BYTES:
                    raise VapiProtocolError(f"the chat is larger than {MAX_CHAT_BYTES} bytes")
        except httpx.DecodingError as exc:
            raise VapiProtocolError(f"undecodable response body: {_describe(exc)}") from exc
        except httpx.TransportError as exc:
            raise VapiConnectError(f"the chat's body broke off: {_describe(exc)}") from exc
        finally:
            await response.aclose()
        try:
            document = pydantic_core.from_json(bytes(body))
        except ValueError as exc:
            raise VapiProtocolError(f"the chat is not JSON: {_describe(exc)}") from exc
        if not isinstance(document, dict):
            raise VapiProtocolError("the chat is not a JSON object")
        return document

    async def _open(
        self, body: dict[str, object], *, request_id: str, attempt: int
    ) -> httpx.Response:
        request = httpx.Request(
            "POST",
            self._chat_url,
            headers=self._headers,
            json=body,
            extensions={"timeout": self._timeout},
        )
        request.headers["X-Request-Id"] = request_id
        request.headers["X-Attempt"] = str(attempt)
        response = await self._send(request)
        try:
            await self._check(response)
        except BaseException:
            await response.aclose()
            raise
        return response

    async def _check(self, response: httpx.Response) -> None:
        status = response.status_code
        if not MIN_HTTP_STATUS <= status <= MAX_HTTP_STATUS:
            raise VapiProtocolError(
                f"Vapi answered HTTP status {status}, outside {MIN_HTTP_STATUS}-{MAX_HTTP_STATUS}: "
                "not an HTTP answer (a broken proxy on the way?)"
            )
        if not 200 <= status < 300:
            raise self._status_error(response, await _read_error_body(response))
        media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "text/event-stream":
            raise VapiProtocolError(
                f"Vapi answered {status} with content type {media_type or 'none'!r}, "
                "not text/event-stream"
            )

    def _status_error(self, response: httpx.Response, body: str) -> VapiStatusError:
        status = response.status_code
        body = self._scrub(body)
        message = f"Vapi answered {status} {_phrase(status)}: {_error_message(body)}"
        if status in (401, 403):
            return VapiAuthError(message, http_status=status, body=body)
        if status == 429:
            header = response.headers.get("retry-after")
            retry_after = None if header is None else parse_retry_after(header, datetime.now(UTC))
            return VapiRateLimitedError(message, body=body, retry_after_s=retry_after)
        return VapiStatusError(message, http_status=status, body=body)

    async def _deltas(self, response: httpx.Response) -> AsyncGenerator[StreamDelta, None]:
        decoder = SSEStreamDecoder()
        chunks = _body_chunks(response)
        try:
            while True:
                try:
                    chunk: bytes | None = await anext(chunks)
                except StopAsyncIteration:
                    chunk = None
                for sse in decoder.feed(chunk) if chunk is not None else decoder.close():
                    event = parse_event(sse)
                    if type(event) is StreamDelta:
                        yield event
                    elif type(event) is StreamDone:
                        return
                    elif type(event) is MalformedEvent:
                        self._count_malformed(event.reason)
                if chunk is None:
                    return
        except httpx.DecodingError as exc:
            raise VapiProtocolError(f"undecodable response body: {_describe(exc)}") from exc
        except httpx.TransportError as exc:
            # The transport's exception wraps the wire's own (``worker.vapi.transport``): name that.
            cause = exc.__cause__ or exc
            raise VapiStreamBrokenError(f"the stream broke off: {_describe(cause)}") from exc
        finally:
            await chunks.aclose()

    def _count_malformed(self, reason: str) -> None:
        self.malformed_events += 1
        if self._on_malformed is not None:
            self._on_malformed(reason)

    def _scrub(self, text: str) -> str:
        for secret in self._scrubbed:
            text = text.replace(secret.get_secret_value(), "**********")
        return text


class _Watchdog:
    """The deadlines of one call, on one lazily re-armed timer.

    ``waiting`` is True while the call's task is inside the generator (so cancelling it interrupts
    I/O on Vapi's behalf) and False while the consumer handles a delta (cancelling then would
    interrupt the consumer's own work, so an expiry is only noted and raised on ``resume``).
    """

    __slots__ = (
        "_cancelling",
        "_loop",
        "_phase",
        "_phase_deadline",
        "_request_deadline",
        "_stall_s",
        "_task",
        "_timer",
        "_timer_at",
        "expired",
        "waiting",
    )

    def __init__(self, timeouts: VapiTimeouts) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("stream_chat must be consumed inside an asyncio task")
        self._task = task
        self._cancelling = task.cancelling()
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._request_deadline = now + timeouts.request_s
        self._phase = "first_delta"
        self._phase_deadline = now + timeouts.first_delta_s
        self._stall_s = timeouts.stall_s
        self.expired: str | None = None
        self.waiting = True
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._arm()

    def _deadline(self) -> tuple[float, str]:
        if self._request_deadline <= self._phase_deadline:
            return self._request_deadline, "request"
        return self._phase_deadline, self._phase

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._deadline()[0]
        self._timer = self._loop.call_at(self._timer_at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        deadline, phase = self._deadline()
        now = self._loop.time()
        if not self.waiting:
            # The consumer holds the task: only the whole-request deadline runs on its time.
            if now >= self._request_deadline:
                self.expired = "request"
            return
        if now < deadline:
            self._arm()  # a delta moved the deadline since this timer was set
            return
        self.expired = phase
        self._task.cancel()

    def resume(self) -> None:
        """The consumer is back for the next delta: raise if the call expired, restart the stall."""
        self.waiting = True
        if self.expired is not None:
            raise self._timeout_error()
        self._phase = "stall"
        self._phase_deadline = self._loop.time() + self._stall_s
        # Usually the deadline only moved later and the armed timer will re-arm itself; re-arm
        # now only when it moved earlier (the first stall deadline may precede the first-delta
        # one) or no timer is armed.
        if self._phase_deadline < self._timer_at:
            self._arm()

    def raise_if_expired(self) -> None:
        """In an ``except CancelledError``: turn this watchdog's own cancel into a timeout."""
        if self.expired is not None and self._task.uncancel() <= self._cancelling:
            raise self._timeout_error() from None

    def stop(self) -> None:
        """Cancel the timer; the call is over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    def _timeout_error(self) -> VapiTimeoutError:
        descriptions = {
            "first_delta": "no first delta from Vapi in time",
            "stall": f"Vapi sent no delta for {self._stall_s:g}s (stalled)",
            "request": "the Vapi call exceeded its overall deadline",
        }
        phase = self.expired or "request"
        return VapiTimeoutError(descriptions.get(phase, phase), phase=phase)


def _body_chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The response body's chunks, as they arrive; close the generator when done with it.

    A body without a content coding (what ``Accept-Encoding: identity`` asks for) is read from
    the transport's stream directly: ``aiter_bytes`` would pass each chunk through two more
    generators and an identity decoder, for every delta.
    """
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    stream = response.stream
    if encoding == "identity" and isinstance(stream, httpx.AsyncByteStream):
        chunks = aiter(stream)
        if isinstance(chunks, AsyncGenerator):
            return chunks
    # httpx declares an AsyncIterator; it is a generator.
    return cast(AsyncGenerator[bytes, None], response.aiter_bytes())


async def _read_error_body(response: httpx.Response) -> str:
    """Up to ``MAX_ERROR_BODY_BYTES`` of an error response; whatever arrived if reading fails."""
    received = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            received += chunk
            if len(received) >= MAX_ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass
    return received[:MAX_ERROR_BODY_BYTES].decode("utf-8", "replace")


def _error_message(body: str) -> str:
    """Vapi's ``{"message": str | [str]}`` when the body has it, else the body text; shortened."""
    try:
        document = pydantic_core.from_json(body)
    except ValueError:
        document = None
    message = document.get("message") if isinstance(document, dict) else None
    if isinstance(message, list):
        message = "; ".join(str(part) for part in message)
    text = message if isinstance(message, str) else body
    text = " ".join(text.split()) or "(empty body)"
    if len(text) > MAX_ERROR_MESSAGE_CHARS:
        return text[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"
    return text


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _describe(exc: BaseException) -> str:
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
