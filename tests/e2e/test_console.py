"""``send`` and ``tail`` against the real broker: where tail starts, and send's missing topic."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.e2e.harness import Topics, produce
from tests.kafka_fixture import create_topics
from worker.config import Settings
from worker.console import tail

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _settings(bootstrap: str, topics: Topics) -> Settings:
    return Settings.model_validate(
        {"kafka_bootstrap_servers": bootstrap, **{k.lower(): v for k, v in topics.env().items()}}
    )


def _response(request_id: str, conversation: str = "c1") -> tuple[bytes, bytes]:
    """A completed chat.response.v1 record (tail reads records by the contract)."""
    body = {
        "request_id": request_id,
        "conversation_id": conversation,
        "chat_id": "chat-1",
        "previous_chat_id": None,
        "status": "completed",
        "text": "",
        "delta_count": 1,
        "attempts": 1,
        "context_reset": False,
        "error": None,
        "timings": {"queued_ms": 0, "first_delta_ms": None, "total_ms": 1},
        "metadata": None,
    }
    return conversation.encode(), json.dumps(body).encode()


def _delta(request_id: str, text: str, conversation: str = "c1") -> tuple[bytes, bytes]:
    body = {
        "request_id": request_id,
        "conversation_id": conversation,
        "chat_id": "chat-1",
        "attempt": 1,
        "seq": 0,
        "delta": text,
        "ts": 1.0,
    }
    return conversation.encode(), json.dumps(body).encode()


async def test_tail_of_a_request_finds_its_reply_published_before_it_started(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """Following one request reads the topics from their beginning: a reply already published
    is shown, other requests are not, and tail returns after that request's final response."""
    topics = Topics.unique(unique_name)
    await create_topics(kafka_bootstrap, [topics.deltas, topics.responses], partitions=3)
    await produce(kafka_bootstrap, topics.deltas, [_delta("r0", "Other"), _delta("r1", "Mine")])
    await produce(kafka_bootstrap, topics.responses, [_response("r0"), _response("r1")])
    out = io.StringIO()
    finals = await asyncio.wait_for(
        tail(_settings(kafka_bootstrap, topics), request_id="r1", out=out), 60
    )
    assert [f["request_id"] for f in finals] == ["r1"]
    assert "Mine" in out.getvalue()
    assert "Other" not in out.getvalue()
    assert "(request r1)" in out.getvalue()


async def test_tail_since_a_time_starts_at_the_first_record_after_it(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """``since_ms`` skips what was published before that time and shows what came after."""
    topics = Topics.unique(unique_name)
    await create_topics(kafka_bootstrap, [topics.deltas, topics.responses], partitions=2)
    await produce(kafka_bootstrap, topics.responses, [_response("before")])
    await asyncio.sleep(0.05)  # broker timestamps are milliseconds: keep the two apart
    since_ms = int(time.time() * 1000)
    await asyncio.sleep(0.05)
    await produce(kafka_bootstrap, topics.responses, [_response("after")])
    finals = await asyncio.wait_for(
        tail(
            _settings(kafka_bootstrap, topics),
            since_ms=since_ms,
            until_responses=1,
            out=io.StringIO(),
        ),
        60,
    )
    assert [f["request_id"] for f in finals] == ["after"]


async def test_send_to_a_missing_request_topic_fails_and_creates_nothing(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """``vapi-worker send`` does not let the broker create the request topic (with the broker's
    default partition count, which the worker would refuse): it exits 2 naming the topic."""
    topics = Topics.unique(unique_name)
    env = {"PATH": "/usr/bin:/bin", "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, **topics.env()}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "send", "--conversation", "c1", "hello"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"topic {topics.requests!r} does not exist" in result.stderr
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert topics.requests not in await admin.list_topics()
    finally:
        await admin.close()
