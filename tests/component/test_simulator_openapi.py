"""The simulator's answers against Vapi's own OpenAPI spec (tests/data/vapi, an excerpt of it).

``GET /chat/{id}`` and a non-streaming ``POST /chat`` answer a ``Chat``; a stream sends
``CreateChatStreamResponse`` events. OpenAPI 3.0 schemas are JSON Schema draft 4 with extras, so
they are checked with the draft 4 validator, where a ``$ref`` ignores its siblings as OpenAPI 3.0
says. One flaw of the spec is patched, and ``test_the_spec_refuses_its_own_example_input`` pins
why: its ``UserMessage`` and ``SystemMessage`` are call-transcript shapes, not chat messages.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft4Validator

from tests.component.test_simulator import KEY, chat_body, events, fast_config, stream_raw
from worker.simulator.pricing import COMPLETION_USD_PER_MTOK, PROMPT_USD_PER_MTOK
from worker.simulator.server import RunningSimulator, serve_simulator

pytestmark = pytest.mark.component

SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "vapi" / "chat-openapi-excerpt.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text("utf-8"))


def _chat_message(role: str) -> dict[str, Any]:
    """A chat message as Vapi's chats carry them (and as the spec's own examples show)."""
    return {
        "type": "object",
        "properties": {"role": {"enum": [role]}, "content": {"type": "string"}},
        "required": ["role", "content"],
    }


def _validator(schema_name: str, *, patched: bool = True) -> Draft4Validator:
    document = copy.deepcopy(SPEC)
    if patched:
        schemas = document["components"]["schemas"]
        schemas["UserMessage"] = _chat_message("user")
        schemas["SystemMessage"] = _chat_message("system")
    return Draft4Validator({**document, "$ref": f"#/components/schemas/{schema_name}"})


def _problems(schema_name: str, instance: object) -> list[str]:
    errors = _validator(schema_name).iter_errors(instance)
    return [f"{list(error.path)}: {error.message[:200]}" for error in errors]


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with serve_simulator(fast_config()) as running:
        yield running


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=sim.base_url, headers=headers, timeout=10) as http:
        yield http


def test_the_spec_refuses_its_own_example_input() -> None:
    """Why the spec is patched: its example ``input`` messages fail its ``Chat.messages`` items.

    When a newer excerpt fixes ``UserMessage``, this fails: drop the patch then.
    """
    example = SPEC["components"]["schemas"]["CreateChatDTO"]["properties"]["input"]["examples"][1]
    chat = {"id": "c", "orgId": "o", "createdAt": "x", "updatedAt": "x", "messages": example}
    assert not _validator("Chat", patched=False).is_valid(chat)
    assert _validator("Chat").is_valid(chat)


async def test_get_chat_answers_a_chat_object_as_the_spec_defines_it(
    client: httpx.AsyncClient,
) -> None:
    """``GET /chat/{id}`` of a streamed chat: a valid ``Chat`` with the reply and its cost."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]
    _, raw = await stream_raw(client, chat_body(messages))
    chat_id = events(raw)[0]["id"]
    response = await client.get(f"/chat/{chat_id}")
    assert response.status_code == 200
    chat = response.json()
    assert _problems("Chat", chat) == []
    assert chat["id"] == chat_id
    assert {"id", "orgId", "createdAt", "updatedAt", "assistantId"} <= chat.keys()
    assert chat["output"] == [
        {"role": "assistant", "content": "".join(e["delta"] for e in events(raw))}
    ]
    [model] = chat["costs"]
    assert model["type"] == "model"
    # Two messages of two words each, plus framing; the reply is the 5-token generic one.
    assert model["promptTokens"] == 2 * (4 + 2)
    assert model["completionTokens"] == 5
    expected = (12 * PROMPT_USD_PER_MTOK + 5 * COMPLETION_USD_PER_MTOK) / 1e6
    assert model["cost"] == pytest.approx(expected)
    assert chat["cost"] == pytest.approx(expected)


async def test_a_longer_context_costs_more_prompt_tokens(client: httpx.AsyncClient) -> None:
    """The next turn reads the earlier one: more prompt tokens, a higher cost."""
    _, first = await stream_raw(client, chat_body("hi"))
    first_id = events(first)[0]["id"]
    _, second = await stream_raw(client, chat_body("again", previousChatId=first_id))
    one = (await client.get(f"/chat/{first_id}")).json()
    two = (await client.get(f"/chat/{events(second)[0]['id']}")).json()
    assert two["costs"][0]["promptTokens"] > one["costs"][0]["promptTokens"]
    assert two["cost"] > one["cost"]


async def test_non_streaming_chat_matches_the_spec(client: httpx.AsyncClient) -> None:
    """A non-streaming ``POST /chat`` answers a ``Chat`` too, the same one ``GET`` returns."""
    response = await client.post("/chat", json={"assistantId": "a1", "input": "hi there"})
    chat = response.json()
    assert _problems("Chat", chat) == []
    assert chat["cost"] > 0
    assert (await client.get(f"/chat/{chat['id']}")).json() == chat


async def test_streamed_events_match_the_spec(client: httpx.AsyncClient) -> None:
    """Every streamed event is a ``CreateChatStreamResponse``."""
    _, raw = await stream_raw(client, chat_body("hi there"))
    assert events(raw)
    for event in events(raw):
        assert _problems("CreateChatStreamResponse", event) == []


async def test_get_chat_needs_the_key_and_an_existing_chat(
    client: httpx.AsyncClient, sim: RunningSimulator
) -> None:
    """401 without the key, 404 for an unknown id, as Vapi answers (its error body)."""
    _, raw = await stream_raw(client, chat_body("hi"))
    chat_id = events(raw)[0]["id"]
    async with httpx.AsyncClient(base_url=sim.base_url) as anonymous:
        assert (await anonymous.get(f"/chat/{chat_id}")).status_code == 401
    missing = await client.get("/chat/chat_nope")
    assert missing.status_code == 404
    assert missing.json()["statusCode"] == 404


async def test_truncate_fault_ends_the_stream_cleanly_and_keeps_the_whole_chat(
    client: httpx.AsyncClient, sim: RunningSimulator
) -> None:
    """``truncate after=2``: two deltas and a clean end; the stored chat has the whole reply."""
    response, raw = await stream_raw(client, chat_body("hi [[sim:fault truncate after=2]]"))
    assert response.status_code == 200
    streamed = "".join(e["delta"] for e in events(raw))
    assert streamed == "Reply to: "
    chat = (await client.get(f"/chat/{events(raw)[0]['id']}")).json()
    assert chat["output"][0]["content"] == "Reply to: hi w4 w5"
    assert sim.state.calls[-1].outcome == "truncated"


async def test_fetch_fault_fails_the_first_gets_only(client: httpx.AsyncClient) -> None:
    """``fetch code=503 gets=2``: the stream is whole, the first two GETs answer 503."""
    _, raw = await stream_raw(client, chat_body("hi [[sim:fault fetch code=503 gets=2]]"))
    chat_id = events(raw)[0]["id"]
    statuses = [(await client.get(f"/chat/{chat_id}")).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
