"""The baseline: the Faust agent one writes after reading Vapi's streaming guide.

One ``@app.agent`` iterates the request topic and handles one request at a time: it opens the
stream with httpx and httpx-sse, and for every delta awaits ``topic.send(...)`` and then the
broker's acknowledgement, before reading the next one; then it sends the response and stores the
chat id in a table for the next turn. Nothing is wrong with it, it is simply serial: one stream in
flight per process, and one broker round trip per delta. The bench runs it on a slice of the load
to show what the worker's concurrency and pipelining buy.

Run by the bench as ``python -m bench.baseline`` with the worker's environment variables
(``KAFKA_BOOTSTRAP_SERVERS``, ``VAPI_BASE_URL``, ``VAPI_API_KEY``, ``VAPI_ASSISTANT_ID``,
``TOPIC_REQUESTS``, ``TOPIC_DELTAS``, ``TOPIC_RESPONSES``, ``WORKER_APP_ID``,
``TOPIC_PARTITIONS``). Its outputs have the worker's message shapes, so the same check applies.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import faust
import httpx
from httpx_sse import aconnect_sse

from worker.config import setting_default


def build_app(env: dict[str, str]) -> faust.App:
    """The baseline app, configured from ``env``."""
    partitions = int(env.get("TOPIC_PARTITIONS", setting_default("topic_partitions")))
    app = faust.App(
        env["WORKER_APP_ID"],
        broker=f"kafka://{env['KAFKA_BOOTSTRAP_SERVERS']}",
        topic_partitions=partitions,
        consumer_auto_offset_reset="earliest",
        store="memory://",
        datadir=tempfile.mkdtemp(prefix="bench-baseline-"),
        web_enabled=False,
    )
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    requests = app.topic(env["TOPIC_REQUESTS"], partitions=partitions, **raw)
    deltas = app.topic(env["TOPIC_DELTAS"], **raw)
    responses = app.topic(env["TOPIC_RESPONSES"], **raw)
    chat_ids = app.Table("chat-ids", default=str, partitions=partitions, key_type=str)
    base_url = env["VAPI_BASE_URL"]
    headers = {"Authorization": f"Bearer {env['VAPI_API_KEY']}"}
    assistant_id = env.get("VAPI_ASSISTANT_ID", "sim-assistant")

    @app.agent(requests)
    async def chat(stream: Any) -> None:
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
            async for key, value in stream.items():
                request = json.loads(value)
                conversation = request["conversation_id"]
                previous = chat_ids[conversation] or None
                body: dict[str, Any] = {
                    "assistantId": assistant_id,
                    "input": request["input"],
                    "stream": True,
                }
                if previous:
                    body["previousChatId"] = previous
                parts: list[str] = []
                chat_id = None
                async with aconnect_sse(http, "POST", "/chat", json=body) as source:
                    async for sse in source.aiter_sse():
                        if sse.data == "[DONE]":
                            break
                        event = json.loads(sse.data)
                        chat_id = event["id"]
                        delta = {
                            "request_id": request["request_id"],
                            "conversation_id": conversation,
                            "chat_id": chat_id,
                            "attempt": 1,
                            "seq": len(parts),
                            "delta": event["delta"],
                            "ts": time.time(),
                        }
                        sent = await deltas.send(key=key, value=json.dumps(delta).encode())
                        await sent  # wait for the broker's ack before the next delta
                        parts.append(event["delta"])
                response = {
                    "request_id": request["request_id"],
                    "conversation_id": conversation,
                    "chat_id": chat_id,
                    "previous_chat_id": previous,
                    "status": "completed",
                    "text": "".join(parts),
                    "delta_count": len(parts),
                    "attempts": 1,
                }
                await (await responses.send(key=key, value=json.dumps(response).encode()))
                chat_ids[conversation] = chat_id

    return app


def main() -> None:
    """Run the baseline worker until SIGTERM."""
    app = build_app(dict(os.environ))
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
