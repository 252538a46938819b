"""Pure byte encoding of the SSE events the simulator writes, right and deliberately wrong.

Why: the exact bytes are the contract the worker's SSE reader is tested against, so they are built
in one place. Vapi sends each delta as one ``data:`` line holding compact JSON, then a blank line;
non-ASCII text is sent as UTF-8, not ``\\u`` escapes, so multi-byte characters really do cross
network chunk boundaries.
"""

from __future__ import annotations

import json

DELTA_PATH = "chat.output[0].content"
DONE_EVENT = b"data: [DONE]\n\n"


def _compact(payload: dict[str, str]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _payload(chat_id: str, session_id: str | None) -> dict[str, str]:
    head = {"id": chat_id} if session_id is None else {"id": chat_id, "sessionId": session_id}
    return {**head, "path": DELTA_PATH}


def delta_event(chat_id: str, delta: str, session_id: str | None = None) -> bytes:
    """``data: {"id":..,"path":"chat.output[0].content","delta":..}`` and a blank line.

    ``sessionId`` follows ``id`` only for chats in a session, as in ``CreateChatStreamResponse``.
    """
    return b"data: " + _compact({**_payload(chat_id, session_id), "delta": delta}) + b"\n\n"


def malformed_event(kind: str, chat_id: str) -> bytes:
    """One broken event of the given kind (see ``faults.MALFORMED_LINES``)."""
    if kind == "nofield":
        return _compact({**_payload(chat_id, None), "delta": "?"}) + b"\n\n"
    if kind == "nodelta":
        return b"data: " + _compact(_payload(chat_id, None)) + b"\n\n"
    if kind == "utf8":
        head = _compact({**_payload(chat_id, None), "delta": ""})[:-2]
        return b"data: " + head + b'\xff\xfe"}\n\n'
    return b"data: {not json\n\n"
