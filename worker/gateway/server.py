"""The gateway's HTTP routes (aiohttp) and its process.

``POST /v1/conversations/{id}/messages`` produces a request (``ChatClient.send``) and answers
202 with its ``request_id``. ``GET /v1/conversations/{id}/events`` is a ``text/event-stream``:
first a ``ready`` event (its id is where the stream starts), then ``delta``, ``restart`` and
``response`` events as the conversation's partition feed folds them (``worker.gateway.feed``).
``Last-Event-ID`` resumes (``worker.gateway.cursor``). Every call needs the conversation's
token (``worker.gateway.tokens``) as ``Authorization: Bearer`` or a ``token`` query parameter:
none is 401, a wrong one 403. ``GET /`` is the chat page; in demo mode (bound to 127.0.0.1
only) it first redirects to a new conversation with a token the gateway issues itself.

Errors are JSON ``{"error": code, "message": text}``. Access logs are off: the query string
carries tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import uuid
from importlib import resources
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp_sse import sse_response
from aiokafka.errors import KafkaError

from vapi_stream_client import ChatClient, InvalidRequestError, TopicMissingError, new_request
from worker.config import Settings
from worker.errors import ConfigError
from worker.gateway.cursor import Cursor, CursorError, SseEvent
from worker.gateway.feed import Feeds, catch_up
from worker.gateway.tokens import issue_token, token_is_valid

log = structlog.get_logger("worker.gateway")

#: How long a browser waits before reconnecting a broken stream (the SSE ``retry`` field).
RECONNECT_MS: Final = 500
#: Seconds between the comments that keep an idle stream open through proxies.
PING_S: Final = 15.0
#: The shortest secret accepted: shorter ones can be guessed.
MIN_SECRET_CHARS: Final = 16
_BODY_FIELDS: Final = frozenset({"input", "request_id"})
_PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the page's address holds the token
    "X-Content-Type-Options": "nosniff",
}


def _error(status: type[web.HTTPException], code: str, message: str) -> web.HTTPException:
    return status(
        text=json.dumps({"error": code, "message": message}),
        content_type="application/json",
        headers={"WWW-Authenticate": "Bearer"} if status is web.HTTPUnauthorized else None,
    )


class Gateway:
    """The routes over one ``ChatClient`` and its ``Feeds``."""

    def __init__(self, settings: Settings, client: ChatClient, secret: str) -> None:
        self.settings = settings
        self.client = client
        self.secret = secret
        self.feeds = Feeds(client, queue_size=settings.gateway_client_queue)
        self.page = resources.files("worker.gateway").joinpath("chat.html").read_bytes()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.add_routes(
            [
                web.get("/", self.chat_page),
                web.get("/healthz", self.healthz),
                web.post("/v1/conversations/{conversation_id}/messages", self.post_message),
                web.get("/v1/conversations/{conversation_id}/events", self.events),
            ]
        )
        return app

    def _authorised(self, request: web.Request) -> str:
        conversation_id = request.match_info["conversation_id"]
        header = request.headers.get("Authorization", "")
        token = request.query.get("token")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise _error(web.HTTPUnauthorized, "unauthorized", "use Authorization: Bearer")
            token = value.strip()
        if not token:
            raise _error(
                web.HTTPUnauthorized,
                "unauthorized",
                "a token is required (Authorization: Bearer, or ?token= for EventSource)",
            )
        if not token_is_valid(self.secret, conversation_id, token):
            raise _error(web.HTTPForbidden, "forbidden", "the token is not this conversation's")
        return conversation_id

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "feeds": len(self.feeds)})

    async def chat_page(self, request: web.Request) -> web.StreamResponse:
        if self.settings.gateway_demo and "conversation" not in request.query:
            conversation_id = f"demo-{uuid.uuid4().hex[:12]}"
            token = issue_token(self.secret, conversation_id)
            raise web.HTTPFound(f"/?conversation={conversation_id}&token={token}")
        return web.Response(
            body=self.page, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS
        )

    async def post_message(self, request: web.Request) -> web.Response:
        conversation_id = self._authorised(request)
        try:
            body: Any = await request.json()
        except ValueError:
            raise _error(web.HTTPBadRequest, "bad_request", "the body is not JSON") from None
        if not isinstance(body, dict) or "input" not in body:
            raise _error(web.HTTPBadRequest, "bad_request", 'the body is {"input": ...}')
        unknown = sorted(set(body) - _BODY_FIELDS)
        if unknown:
            raise _error(web.HTTPBadRequest, "bad_request", f"unknown fields: {unknown}")
        try:
            chat_request = new_request(
                conversation_id, body["input"], request_id=body.get("request_id")
            )
        except InvalidRequestError as exc:
            raise _error(web.HTTPBadRequest, "invalid_request", str(exc)) from None
        if chat_request.input_chars() > self.settings.max_input_chars:
            # The worker would dead-letter it and the browser would wait for nothing.
            raise _error(
                web.HTTPBadRequest,
                "input_too_large",
                f"the input is longer than {self.settings.max_input_chars} characters",
            )
        try:
            request_id = await self.client.send_request(chat_request)
        except InvalidRequestError as exc:
            raise _error(web.HTTPBadRequest, "invalid_request", str(exc)) from None
        except (TopicMissingError, KafkaError) as exc:
            log.warning("gateway_send_failed", error=repr(exc))
            raise _error(
                web.HTTPServiceUnavailable, "unavailable", "the request topic cannot be written"
            ) from None
        return web.json_response({"request_id": request_id}, status=202)

    async def events(self, request: web.Request) -> web.StreamResponse:
        conversation_id = self._authorised(request)
        # The header is the browser's own reconnect; the parameter is a page's first connect
        # after a reload (EventSource cannot set the header), older than the header when both.
        last_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id", "")
        since = None
        if last_id:
            try:
                since = Cursor.parse(last_id)
            except CursorError as exc:
                raise _error(web.HTTPBadRequest, "bad_event_id", str(exc)) from None
        try:
            feed = await self.feeds.feed_for(conversation_id)
        except (TopicMissingError, KafkaError) as exc:
            log.warning("gateway_feed_failed", error=repr(exc))
            raise _error(
                web.HTTPServiceUnavailable, "unavailable", "the output topics cannot be read"
            ) from None
        subscription, now = feed.subscribe(conversation_id)
        try:
            backlog: list[SseEvent] = []
            if since is not None:
                try:
                    backlog = await catch_up(
                        feed,
                        conversation_id,
                        since,
                        now,
                        lookback_s=self.settings.gateway_resume_lookback_s,
                        max_records=self.settings.gateway_resume_max_records,
                    )
                except CursorError as exc:
                    raise _error(web.HTTPGone, "cannot_resume", str(exc)) from None
            async with sse_response(request, ping_interval=PING_S) as sse:
                start = since or now
                await sse.send(
                    json.dumps({"conversation_id": conversation_id}),
                    id=start.encode(),
                    event="ready",
                    retry=RECONNECT_MS,
                )
                for event in backlog:
                    await sse.send(event.data, id=event.id, event=event.name)
                while (live := await subscription.queue.get()) is not None:
                    await sse.send(live.data, id=live.id, event=live.name)
            return sse
        finally:
            feed.unsubscribe(subscription)


def gateway_secret(settings: Settings) -> str:
    """The secret tokens are made with; demo mode makes one up when none is set."""
    if settings.gateway_demo and settings.gateway_host != "127.0.0.1":
        raise ConfigError(
            "GATEWAY_DEMO issues tokens to anyone who asks: it needs GATEWAY_HOST=127.0.0.1"
        )
    secret = settings.gateway_secret.get_secret_value() if settings.gateway_secret else ""
    if secret:  # empty is unset
        if len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(f"GATEWAY_SECRET must be at least {MIN_SECRET_CHARS} characters")
        return secret
    if settings.gateway_demo:
        return secrets.token_urlsafe(32)
    raise ConfigError("GATEWAY_SECRET is required (or GATEWAY_DEMO=true on 127.0.0.1)")


async def serve(settings: Settings, client: ChatClient, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    gateway = Gateway(settings, client, gateway_secret(settings))
    runner = web.AppRunner(gateway.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, settings.gateway_host, settings.gateway_port)
    await site.start()
    log.info(
        "gateway_started",
        host=settings.gateway_host,
        port=settings.gateway_port,
        demo=settings.gateway_demo,
    )
    try:
        await stop.wait()
    finally:
        await gateway.feeds.stop()
        await runner.cleanup()


def run_gateway(settings: Settings) -> int:
    """``vapi-worker gateway``: serve until SIGTERM or SIGINT."""
    from worker.console import chat_client

    gateway_secret(settings)  # a configuration error before anything connects

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with chat_client(settings) as client:
            await serve(settings, client, stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
