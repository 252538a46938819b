"""The chat page in a real headless Chromium, through the real gateway, broker, worker and
simulator: type and press Enter, watch the reply stream, the assistant remembers, reload and
carry on, a restarted stream is cleared instead of doubled, the gateway killed mid-stream loses
and repeats nothing, errors are shown.

``UPDATE_SCREENSHOT=1`` also writes the page after two turns to docs/chat-page.png (the
README's picture).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.chromium import Chromium
from tests.e2e.gateway_process import GatewayProcess, worker_and_gateway
from tests.e2e.harness import ROOT, SimulatorProcess, Topics, WorkerProcess, read_topic

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BUBBLES = "[...document.querySelectorAll('#log .msg')]"
LAST_REPLY = "[...document.querySelectorAll('#log .assistant')].at(-1)"
GATEWAY_ENV = {"MAX_INPUT_CHARS": "200"}
DELTAS_SHOWN = "window.chatEvents.filter(e => e.type === 'delta').length"


SIM_ARGS = ("--first-token-latency-s", "0.05", "--inter-token-delay-s", "0.03")


@pytest.fixture
async def stack(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[tuple[WorkerProcess, GatewayProcess]]:
    async with worker_and_gateway(
        kafka_bootstrap, topics, simulator, tmp_path, 4, **GATEWAY_ENV
    ) as running:
        yield running


async def _say(page: Chromium, text: str, turn: int) -> dict[str, Any]:
    """Type ``text``, press Enter; the reply bubble once the final response has arrived."""
    await page.evaluate("document.getElementById('text').focus()")
    await page.type_and_press_enter(text)
    await page.wait_for(
        f"{BUBBLES}.filter(b => b.classList.contains('assistant')).length >= {turn}"
    )
    await page.wait_for(f"{LAST_REPLY}.dataset.status === 'completed'", timeout_s=60)
    reply: dict[str, Any] = await page.evaluate(
        f"({{text: {LAST_REPLY}.textContent, request_id: {LAST_REPLY}.dataset.requestId}})"
    )
    return reply


async def _events_of(page: Chromium, request_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = await page.evaluate(
        f"window.chatEvents.filter(e => e.request_id === {json.dumps(request_id)})"
    )
    return events


async def _finals(bootstrap: str, topics: Topics) -> dict[str, dict[str, Any]]:
    records = await read_topic(bootstrap, topics.responses, timeout_s=5)
    return {body["request_id"]: body for body in (json.loads(record.value) for record in records)}


def _streamed(events: list[dict[str, Any]]) -> str:
    """The text a reader of these events shows: the deltas after the last restart."""
    restarts = [i for i, e in enumerate(events) if e["type"] == "restart"]
    start = restarts[-1] + 1 if restarts else 0
    return "".join(e["text"] for e in events[start:] if e["type"] == "delta")


async def test_the_chat_page_in_chromium(
    stack: tuple[WorkerProcess, GatewayProcess],
    kafka_bootstrap: str,
    topics: Topics,
    tmp_path: Path,
) -> None:
    _, gateway = stack
    conversation = "page-conversation"
    url = f"{gateway.base_url}/?conversation={conversation}&token={gateway.token(conversation)}"
    async with Chromium(tmp_path / "profile") as page:
        await page.open(url)
        await page.wait_for("document.getElementById('status').textContent === 'connected'")

        # Two turns: the second is answered from memory; the screen shows the final response.
        first = await _say(page, "Hello! My name is Ada.", 1)
        second = await _say(page, "What is my name?", 2)
        finals = await _finals(kafka_bootstrap, topics)
        assert first["text"] == finals[first["request_id"]]["text"]
        assert first["text"] == "Nice to meet you, Ada! I will remember your name."
        assert second["text"] == finals[second["request_id"]]["text"] == "Your name is Ada."
        for reply in (first, second):
            events = await _events_of(page, reply["request_id"])
            assert [e["type"] for e in events][-1] == "response"
            assert _streamed(events) == reply["text"]  # the text arrived as deltas
        shot = tmp_path / "chat-page.png"
        await page.screenshot(shot)
        assert shot.read_bytes().startswith(b"\x89PNG")
        if os.environ.get("UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, ROOT / "docs" / "chat-page.png")

        # Reload and carry on: the transcript is still there and the assistant still remembers.
        await page.reload()
        texts = await page.evaluate(f"{BUBBLES}.map(b => b.textContent)")
        assert texts == [
            "Hello! My name is Ada.",
            first["text"],
            "What is my name?",
            second["text"],
        ]
        await page.wait_for("document.getElementById('status').textContent === 'connected'")

        # Left and opened again mid-reply: the page resumes from the last event id it saved with its
        # transcript, so the reply's text streamed before and after the reload is the final one.
        await page.evaluate("document.getElementById('text').focus()")
        await page.type_and_press_enter("Go on [[sim:pace tokens=30 delay_ms=60]]")
        await page.wait_for(f"{DELTAS_SHOWN} >= {await page.evaluate(DELTAS_SHOWN) + 5}")
        await page.open("about:blank")  # away for a second (deltas go on), then back
        await asyncio.sleep(1)
        await page.open(url)
        await page.wait_for(f"{LAST_REPLY}.dataset.status === 'completed'", timeout_s=60)
        saved = await page.evaluate(f"JSON.parse(sessionStorage.getItem('chat:{conversation}'))")
        reloaded = saved["transcript"][-1]
        final = (await _finals(kafka_bootstrap, topics))[reloaded["request_id"]]
        assert reloaded["streamed"] == final["text"] == reloaded["text"]
        assert final["delta_count"] == 30
        resumed = await _events_of(page, reloaded["request_id"])
        assert 0 < len(resumed) < 30, "the reloaded page got the rest of the reply, not all"

        # A stream broken after 3 deltas and retried: a restart clears the partial reply.
        third = await _say(
            page, "What is my name, again? [[sim:fault disconnect after=3 times=1]]", 4
        )
        events = await _events_of(page, third["request_id"])
        assert "restart" in [e["type"] for e in events], [
            (e["type"], e.get("attempt"), e.get("seq"), e.get("text")) for e in events
        ]
        assert third["text"] == finals_text(await _finals(kafka_bootstrap, topics), third)
        assert third["text"] == "Your name is Ada."
        assert _streamed(events) == third["text"]

        # The gateway killed mid-stream and started again: the page reconnects with its last
        # event id and gets every remaining delta once.
        await page.evaluate("document.getElementById('text').focus()")
        await page.type_and_press_enter("Tell me more [[sim:pace tokens=40 delay_ms=60]]")
        shown_before = await page.evaluate(DELTAS_SHOWN)
        await page.wait_for(f"{DELTAS_SHOWN} >= {shown_before + 5}")
        assert await page.evaluate(f"{LAST_REPLY}.dataset.status") == "streaming"
        gateway.kill()
        restarted = GatewayProcess(
            kafka_bootstrap, topics, tmp_path, port=gateway.port, **GATEWAY_ENV
        ).start()
        try:
            await page.wait_for(f"{LAST_REPLY}.dataset.status === 'completed'", timeout_s=60)
            fourth = await page.evaluate(
                f"({{text: {LAST_REPLY}.textContent, request_id: {LAST_REPLY}.dataset.requestId}})"
            )
            events = await _events_of(page, fourth["request_id"])
            deltas = [e for e in events if e["type"] == "delta"]
            keys = [(e["attempt"], e["chat_id"], e["seq"]) for e in deltas]
            assert len(keys) == len(set(keys)), "a delta was shown twice"
            assert [k[2] for k in keys] == list(range(len(keys))), "a delta was lost"
            final = (await _finals(kafka_bootstrap, topics))[fourth["request_id"]]
            assert len(keys) == final["delta_count"] == 40
            assert _streamed(events) == final["text"] == fourth["text"]
            assert "reconnecting" not in await page.evaluate(
                "document.getElementById('status').textContent"
            )

            roles = await page.evaluate(f"{BUBBLES}.map(b => b.classList[1])")
            assert roles == ["user", "assistant"] * 5, "one bubble per message and reply"

            # Errors are shown: a message the worker would refuse says why it was not sent,
            # and a wrong token's page says its stream was refused and offers no field.
            await page.evaluate("document.getElementById('text').focus()")
            await page.type_and_press_enter("x" * 201)
            shown = await page.wait_for("document.getElementById('error').textContent")
            assert "Not sent (400)" in shown
            assert "longer than 200 characters" in shown
            async with Chromium(tmp_path / "profile-2") as other:
                await other.open(f"{gateway.base_url}/?conversation={conversation}&token=wrong")
                shown = await other.wait_for("document.getElementById('error').textContent")
                assert "refused" in shown
                assert await other.evaluate("document.getElementById('text').disabled")
        finally:
            restarted.stop()


def finals_text(finals: dict[str, dict[str, Any]], reply: dict[str, Any]) -> str:
    text: str = finals[reply["request_id"]]["text"]
    return text
