"""``POST /chat`` and ``GET /chat/{id}``: the Vapi endpoints the simulator speaks.

Why one module: the order of checks is itself behaviour clients notice, and it is Vapi's order:
auth (401), body and ``CreateChatDTO`` (400), then the organisation's limit on chats at once
(429 with ``Retry-After``, when configured), then the call's faults (so a simulated 429 needs a
valid request), then the conversation context (404 unknown ``previousChatId``/``sessionId``, 400
other assistant), then the reply, streamed or whole. Every call is recorded, however it ends.

``GET /chat/{id}`` answers a stored chat as Vapi's ``Chat`` object (with its ``cost`` and
``costs``): auth (401), then 404 for a chat never stored (one whose stream broke off is not),
then the chat's ``fetch`` faults.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import struct
import time
from email.utils import formatdate
from http import HTTPStatus

from aiohttp import web

from worker.simulator.config import SimulatorConfig
from worker.simulator.directives import ParsedInput, parse_input
from worker.simulator.errors import ChatRejectedError, SpecError
from worker.simulator.faults import (
    DisconnectFault,
    FaultPlan,
    MalformedFault,
    RawStatusFault,
    ResetFault,
    StallFault,
    StatusFault,
)
from worker.simulator.replies import bulk_reply, compose_reply, split_tokens
from worker.simulator.state import CallRecord, SimulatorState, StoredChat
from worker.simulator.streaming import ReplyStream, StreamPlan
from worker.simulator.validation import CreateChatBody, validate_create_chat_body

_JSON = "application/json"
#: Vapi (Node) sends compact JSON with UTF-8 text; so does the simulator.
_dumps = functools.partial(json.dumps, separators=(",", ":"), ensure_ascii=False)


def error_response(
    status: int, message: str | list[str], headers: dict[str, str] | None = None
) -> web.Response:
    """Vapi's error body: ``{"message", "error": <reason phrase>, "statusCode"}``."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = {"message": message, "error": phrase, "statusCode": status}
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _status_fault_response(fault: StatusFault) -> web.Response:
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = fault.retry_after
    elif fault.retry_after_in_s is not None:
        headers["Retry-After"] = formatdate(time.time() + fault.retry_after_in_s, usegmt=True)
    message = fault.message or f"Simulated {fault.code} {HTTPStatus(fault.code).phrase}"
    return error_response(fault.code, message, headers)


def _raw_status_response(request: web.Request, fault: RawStatusFault) -> web.Response:
    """Write a bare status line with ``fault.code`` (aiohttp would check it), then close."""
    body = b"broken proxy"
    head = f"HTTP/1.1 {fault.code} Broken\r\nContent-Type: text/plain\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    if request.transport is not None:
        request.transport.write(head.encode() + body)
    return _close_connection(request)


def _reset_connection(request: web.Request) -> web.Response:
    """Drop the connection with a TCP RST, so the client sees a reset, not a clean close."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)  # never reaches the client: the connection is gone


def _close_connection(request: web.Request) -> web.Response:
    """Close the connection cleanly (FIN) without having sent a response."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)  # never reaches the client: the connection is gone


def _int_header(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


class ChatHandler:
    """Serves ``POST /chat`` against one config and one state."""

    def __init__(self, config: SimulatorConfig, state: SimulatorState) -> None:
        self._config = config
        self._state = state
        #: Calls past the organisation's limit check and not yet answered in full.
        self._admitted = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one call and record how it went."""
        call = self._state.begin_call(
            request.headers.get("X-Request-Id"), _int_header(request.headers.get("X-Attempt"))
        )
        try:
            return await self._answer(request, call)
        except ChatRejectedError as exc:
            call.status, call.outcome = exc.status, "rejected"
            return error_response(exc.status, exc.message)
        except asyncio.CancelledError:
            call.outcome = "client_closed"
            raise
        finally:
            call.ended_at = time.time()

    async def _answer(self, request: web.Request, call: CallRecord) -> web.StreamResponse:
        self._check_auth(request)
        chat_body = validate_create_chat_body(await self._read_json(request))
        call.note_request(chat_body)
        limit = self._config.max_chats
        if limit and self._admitted >= limit:
            call.status, call.outcome = 429, "over_limit"
            self._state.stats.over_limit += 1
            retry_after = f"{self._config.max_chats_retry_after_s:g}"
            message = f"Simulated organisation limit: {limit} chats at once"
            return error_response(429, message, {"Retry-After": retry_after})
        self._admitted += 1
        try:
            return await self._answer_admitted(request, call, chat_body)
        finally:
            self._admitted -= 1

    async def _answer_admitted(
        self, request: web.Request, call: CallRecord, chat_body: CreateChatBody
    ) -> web.StreamResponse:
        try:
            parsed = parse_input(chat_body.input)
        except SpecError as exc:
            raise ChatRejectedError(400, [f"simulator directive: {exc}"]) from None
        faults = self._state.faults.arm(
            parsed.faults,
            call_key=request.headers.get("X-Request-Id") or parsed.raw_text,
            assistant_id=chat_body.assistant_id,
            input_text=parsed.raw_text,
        )
        call.fault = faults.kinds
        if isinstance(faults.before_response, StatusFault):
            call.status, call.outcome = faults.before_response.code, "fault"
            return _status_fault_response(faults.before_response)
        if isinstance(faults.before_response, RawStatusFault):
            call.status, call.outcome = faults.before_response.code, "fault"
            return _raw_status_response(request, faults.before_response)
        if isinstance(faults.before_response, ResetFault):
            call.outcome = "reset"
            return _reset_connection(request)
        chat = self._new_chat(chat_body, parsed, faults)
        call.chat_id = chat.id
        if chat_body.stream:
            return await self._stream(request, call, chat, self._plan(chat, parsed, faults))
        return await self._whole(request, call, chat, self._plan(chat, parsed, faults))

    def _check_auth(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {self._config.api_key}":
            raise ChatRejectedError(401, "Invalid or missing API key (Authorization: Bearer)")

    @staticmethod
    async def _read_json(request: web.Request) -> object:
        try:
            return json.loads(await request.read())
        except ValueError:
            raise ChatRejectedError(400, ["request body is not valid JSON"]) from None

    async def get_chat(self, request: web.Request) -> web.Response:
        """``GET /chat/{id}``: the stored chat, as Vapi's ``Chat`` object."""
        try:
            self._check_auth(request)
        except ChatRejectedError as exc:
            return error_response(exc.status, exc.message)
        chat_id = request.match_info["id"]
        chat = self._state.chats.get(chat_id)
        if chat is None:
            return error_response(404, f"Chat {chat_id} not found")
        fault = chat.fetch_fault()
        if fault is not None:
            return error_response(fault.code, f"Simulated {fault.code} on GET /chat/{{id}}")
        return web.json_response(chat.to_json(), dumps=_dumps)

    def _new_chat(
        self, chat_body: CreateChatBody, parsed: ParsedInput, faults: FaultPlan
    ) -> StoredChat:
        context = self._state.resolve_context(chat_body)
        pace = parsed.pace
        tokens = self._config.reply_tokens if pace.tokens is None else pace.tokens
        if pace.token_chars is not None:
            reply = bulk_reply(tokens, pace.token_chars, pace.char or "x")
        else:
            reply = compose_reply(context.history, parsed.user_text, tokens)
        return self._state.new_chat(
            chat_body, context, list(parsed.messages), reply, faults.on_fetch
        )

    def _plan(self, chat: StoredChat, parsed: ParsedInput, faults: FaultPlan) -> StreamPlan:
        pace, config = parsed.pace, self._config
        return StreamPlan(
            chat_id=chat.id,
            session_id=chat.session_id,
            tokens=split_tokens(str(chat.output[0]["content"])),
            first_delay_s=config.first_token_latency_s if pace.first_s is None else pace.first_s,
            delay_s=config.inter_token_delay_s if pace.delay_s is None else pace.delay_s,
            faults=faults.in_stream,
            done_marker=config.done_marker,
            record_times=config.record_delta_times,
        )

    async def _stream(
        self, request: web.Request, call: CallRecord, chat: StoredChat, plan: StreamPlan
    ) -> web.StreamResponse:
        def complete() -> None:
            self._state.commit(chat)

        return await ReplyStream(request, plan, call, self._state).send(complete)

    async def _whole(
        self, request: web.Request, call: CallRecord, chat: StoredChat, plan: StreamPlan
    ) -> web.StreamResponse:
        """Non-streaming: wait as long as generating would take, then send the ``Chat`` object.

        Stream faults map onto a single body: ``stall`` adds its pause, ``disconnect`` closes
        the connection without a response, ``malformed`` sends a truncated JSON body.
        """
        generation_s = plan.first_delay_s + plan.delay_s * max(len(plan.tokens) - 1, 0)
        stalls = sum(f.seconds for f in plan.faults if isinstance(f, StallFault))
        await asyncio.sleep(generation_s + stalls)
        if any(isinstance(f, DisconnectFault) for f in plan.faults):
            call.outcome = "disconnected"
            return _close_connection(request)
        call.status = 200
        if any(isinstance(f, MalformedFault) for f in plan.faults):
            call.outcome = "malformed"
            return web.Response(body=b'{"id": "' + chat.id.encode(), content_type=_JSON)
        self._state.commit(chat)
        call.outcome = "completed"
        return web.json_response(chat.to_json(), dumps=_dumps)
