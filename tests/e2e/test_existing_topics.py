"""Topics that exist before the worker starts: it adopts the request topic's partition count.

The workers here run with ``TOPIC_PARTITIONS=4`` (the harness default); the request topic made
beforehand has another count, as when a producer or the cluster's auto-creation made it first.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.e2e.harness import (
    OutputReader,
    SimulatorProcess,
    Topics,
    WorkerProcess,
    produce,
    request_record,
)
from tests.kafka_fixture import create_topics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CONFIGURED = 4  # TOPIC_PARTITIONS of the harness's workers
EXISTING = 3  # partitions of the request topic made before the worker starts
SIM_ARGS = ("--first-token-latency-s", "0.02", "--inter-token-delay-s", "0.002")


async def _partitions(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    return {topic["topic"]: len(topic["partitions"]) for topic in described}


async def _topic_names(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_an_existing_request_topic_gives_its_partition_count_to_the_table_and_outputs(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """The worker starts on a 3-partition request topic although TOPIC_PARTITIONS is 4.

    The changelog and the missing output topics get 3 partitions; requests on every partition
    complete, and a conversation's second turn finds its first turn's chat in the table.
    """
    await create_topics(kafka_bootstrap, [topics.requests], partitions=EXISTING)
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    try:
        worker.wait_ready()
        names = [topics.deltas, topics.responses, topics.dlq, topics.changelog()]
        assert await _partitions(kafka_bootstrap, names) == dict.fromkeys(names, EXISTING)

        conversations = [f"conv-{n}" for n in range(6)]
        first = [request_record(c, f"{c}-1", f"My name is N{c[-1]}.") for c in conversations]
        second = [request_record(c, f"{c}-2", "What's my name?") for c in conversations]
        async with OutputReader(kafka_bootstrap, topics) as reader:
            placed = await produce(kafka_bootstrap, topics.requests, first)
            await reader.wait_for_responses([f"{c}-1" for c in conversations])
            await produce(kafka_bootstrap, topics.requests, second)
            await reader.wait_for_responses([f"{c}-2" for c in conversations])
        assert {meta.partition for meta in placed} == set(range(EXISTING))
        answers = {r["request_id"]: r for r in reader.outputs.responses}
        for conv in conversations:
            answer = answers[f"{conv}-2"]
            assert answer["status"] == "completed", answer
            assert answer["text"] == f"Your name is N{conv[-1]}.", answer
            assert answer["previous_chat_id"] == answers[f"{conv}-1"]["chat_id"]
    finally:
        worker.terminate()


async def test_a_changelog_whose_partition_count_disagrees_stops_the_worker_with_a_message(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> None:
    """A changelog of 2 partitions beside a 3-partition request topic: exit 2, nothing created."""
    await create_topics(kafka_bootstrap, [topics.requests], partitions=EXISTING)
    await create_topics(kafka_bootstrap, [topics.changelog()], partitions=2)
    worker = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    assert worker.proc is not None
    try:
        code = worker.proc.wait(90)
    except subprocess.TimeoutExpired:
        worker.kill()
        raise AssertionError(f"the worker kept running:\n{worker.log_tail()}") from None
    worker.kill()  # closes its log
    log = worker.log_path.read_text()
    assert code == 2, log
    assert (
        f"vapi-worker: the changelog topic {topics.changelog()!r} has 2 partitions but the "
        f"request topic {topics.requests!r} has {EXISTING}"
    ) in log
    assert not {topics.deltas, topics.responses, topics.dlq} & await _topic_names(kafka_bootstrap)
