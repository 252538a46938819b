"""Pure: is what the reader saw correct, and what does it measure.

Correctness (any failure fails the bench): every request has exactly one response, ``completed``;
the deltas of its final attempt arrived in seq order 0..n-1 without gaps or repeats, carry the
response's chat id, number ``delta_count`` (= the simulator's reply length) and concatenate to the
response's text; each later turn of a conversation continued from the previous turn's chat; no
record went to the dead-letter topic and no response names an unknown request. For the worker,
also what a consuming service sees: its deltas and responses folded by the client
(``StreamFolder``) show each request's response text, once.

Added latency of a delta: the reader's read time minus the simulator's write time of the same
``(chat_id, seq)`` (``GET /_sim/delta-times``), for the final attempt's deltas. It is split at the
delta's ``ts`` (the worker's clock when it received the delta; same machine, same clock) into
simulator→worker (the worker reading late) and worker→reader (producer, broker, reader).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vapi_stream_client import ChatDelta, ChatResponse, Delta, Response, Restart, StreamFolder


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of the load."""

    request_id: str
    conversation_id: str
    turn: int

    def record(self) -> tuple[bytes, bytes]:
        """The Kafka record: key = conversation id, value = the ``ChatRequest`` JSON."""
        body = {
            "request_id": self.request_id,
            "conversation_id": self.conversation_id,
            "input": f"bench {self.conversation_id} turn {self.turn}",
        }
        return self.conversation_id.encode(), json.dumps(body).encode()


def build_load(requests: int, conversations: int) -> list[RequestSpec]:
    """``requests`` requests over ``conversations`` conversations, turn by turn (turn 1 of every
    conversation first): request ``i`` is turn ``i // conversations + 1`` of conversation
    ``i % conversations``."""
    return [
        RequestSpec(
            f"c{i % conversations:05d}-t{i // conversations + 1}",
            f"c{i % conversations:05d}",
            i // conversations + 1,
        )
        for i in range(requests)
    ]


def slice_load(
    load: Sequence[RequestSpec], conversations: int, fraction: float
) -> list[RequestSpec]:
    """The requests of the first ``fraction`` of the conversations (at least one)."""
    keep = {f"c{i:05d}" for i in range(max(1, round(conversations * fraction)))}
    return [spec for spec in load if spec.conversation_id in keep]


@dataclass
class Verdict:
    """The check's findings and the raw measurements it derived."""

    errors: list[str] = field(default_factory=list)
    deltas: int = 0
    retried_requests: int = 0
    latencies_s: list[float] = field(default_factory=list)
    #: The two parts of each latency, split at the delta's ``ts`` (when the worker received it).
    receive_latencies_s: list[float] = field(default_factory=list)
    publish_latencies_s: list[float] = field(default_factory=list)
    first_call_at: float | None = None
    last_response_at: float | None = None
    mean_delta_bytes: float = 0.0

    def fail(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)
        elif len(self.errors) == 20:
            self.errors.append("... (more errors not shown)")

    @property
    def window_s(self) -> float:
        if self.first_call_at is None or self.last_response_at is None:
            return 0.0
        return max(self.last_response_at - self.first_call_at, 1e-9)


@dataclass(slots=True)
class _Delta:
    read_at: float
    ts: float
    attempt: int
    seq: int
    chat_id: str
    text: str


def verify(
    load: Sequence[RequestSpec],
    deltas: Sequence[tuple[float, bytes]],
    responses: Sequence[tuple[float, dict[str, Any]]],
    dead_letters: int,
    sim_calls: Sequence[Mapping[str, Any]],
    delta_times: Mapping[str, Sequence[float]],
    reply_tokens: int,
    *,
    contract: bool = True,
) -> Verdict:
    """Check the outputs of one run against its load; measure what they show.

    ``contract``: the outputs are the worker's, complete messages, also read with the client's
    folding. The baseline agent writes only the fields the other checks read.
    """
    verdict = Verdict()
    if dead_letters:
        verdict.fail(f"{dead_letters} record(s) went to the dead-letter topic")
    by_request = _group_deltas(deltas, verdict)
    final = _final_responses(load, responses, verdict)
    for spec in load:
        response = final.get(spec.request_id)
        if response is not None:
            _check_request(spec, response, by_request.get(spec.request_id, []), verdict)
            _measure_latency(response, by_request.get(spec.request_id, []), delta_times, verdict)
            if response.get("delta_count") != reply_tokens:
                verdict.fail(
                    f"{spec.request_id}: {response.get('delta_count')} deltas, "
                    f"the simulator sends {reply_tokens}"
                )
    _check_chains(load, final, verdict)
    if contract:
        _check_folded(deltas, responses, verdict)
    starts = [call["started_at"] for call in sim_calls if call.get("started_at") is not None]
    verdict.first_call_at = min(starts, default=None)
    verdict.last_response_at = max((at for at, _ in responses), default=None)
    return verdict


def _group_deltas(
    deltas: Sequence[tuple[float, bytes]], verdict: Verdict
) -> dict[str, list[_Delta]]:
    grouped: dict[str, list[_Delta]] = defaultdict(list)
    total_bytes = 0
    for read_at, raw in deltas:
        total_bytes += len(raw)
        value = json.loads(raw)
        grouped[value["request_id"]].append(
            _Delta(
                read_at,
                value["ts"],
                value["attempt"],
                value["seq"],
                value["chat_id"],
                value["delta"],
            )
        )
    verdict.mean_delta_bytes = total_bytes / len(deltas) if deltas else 0.0
    return grouped


def _check_folded(
    deltas: Sequence[tuple[float, bytes]],
    responses: Sequence[tuple[float, dict[str, Any]]],
    verdict: Verdict,
) -> None:
    """Each completed response's text is what the client's folding shows for its request."""
    folder = StreamFolder(max_requests=max(1, len(responses)))
    shown: dict[str, str] = defaultdict(str)
    events = [e for _, raw in deltas for e in folder.on_delta(ChatDelta.model_validate_json(raw))]
    for _, value in responses:
        events += folder.on_response(ChatResponse.model_validate(value))
    for event in events:
        if isinstance(event, Restart):
            shown[event.request_id] = ""
        elif isinstance(event, Delta):
            shown[event.request_id] += event.text
        elif isinstance(event, Response) and not _shows_answer(shown, event.response):
            verdict.fail(
                f"{event.request_id}: the client's folding shows "
                f"{shown[event.request_id][:60]!r}..., the response's text is "
                f"{event.response.text[:60]!r}..."
            )


def _shows_answer(shown: Mapping[str, str], response: ChatResponse) -> bool:
    return response.status != "completed" or shown[response.request_id] == response.text


def _final_responses(
    load: Sequence[RequestSpec],
    responses: Sequence[tuple[float, dict[str, Any]]],
    verdict: Verdict,
) -> dict[str, dict[str, Any]]:
    wanted = {spec.request_id for spec in load}
    seen: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, response in responses:
        seen[response["request_id"]].append(response)
    for request_id in sorted(set(seen) - wanted):
        verdict.fail(f"response for a request that was never sent: {request_id}")
    final: dict[str, dict[str, Any]] = {}
    for spec in load:
        found = seen.get(spec.request_id, [])
        if len(found) != 1:
            verdict.fail(f"{spec.request_id}: {len(found)} responses, expected exactly 1")
            continue
        response = found[0]
        if response.get("status") != "completed":
            verdict.fail(
                f"{spec.request_id}: status {response.get('status')}: {response.get('error')}"
            )
            continue
        final[spec.request_id] = response
    return final


def _check_request(
    spec: RequestSpec, response: Mapping[str, Any], deltas: Sequence[_Delta], verdict: Verdict
) -> None:
    attempt = response["attempts"]
    if attempt > 1:
        verdict.retried_requests += 1
    mine = [d for d in deltas if d.attempt == attempt]
    seqs = [d.seq for d in mine]
    if seqs != list(range(len(mine))):
        verdict.fail(f"{spec.request_id}: deltas out of seq order or repeated: {seqs[:20]}...")
    if len(mine) != response["delta_count"]:
        verdict.fail(
            f"{spec.request_id}: {len(mine)} deltas read, response says {response['delta_count']}"
        )
    text = "".join(d.text for d in mine)
    if text != response["text"]:
        verdict.fail(
            f"{spec.request_id}: deltas concatenate to {text[:60]!r}..., "
            f"the response's text is {response['text'][:60]!r}..."
        )
    if any(d.chat_id != response["chat_id"] for d in mine):
        verdict.fail(f"{spec.request_id}: a delta carries another chat id than the response")
    verdict.deltas += len(mine)


def _measure_latency(
    response: Mapping[str, Any],
    deltas: Sequence[_Delta],
    delta_times: Mapping[str, Sequence[float]],
    verdict: Verdict,
) -> None:
    written = delta_times.get(response["chat_id"])
    if written is None:
        verdict.fail(f"{response['request_id']}: the simulator has no write times for its chat")
        return
    for delta in deltas:
        if delta.attempt == response["attempts"] and delta.seq < len(written):
            verdict.latencies_s.append(delta.read_at - written[delta.seq])
            verdict.receive_latencies_s.append(delta.ts - written[delta.seq])
            verdict.publish_latencies_s.append(delta.read_at - delta.ts)


def _check_chains(
    load: Sequence[RequestSpec], final: Mapping[str, Mapping[str, Any]], verdict: Verdict
) -> None:
    previous: dict[str, str | None] = {}
    for spec in sorted(load, key=lambda s: (s.conversation_id, s.turn)):
        response = final.get(spec.request_id)
        if response is None:
            previous.pop(spec.conversation_id, None)
            continue
        if spec.turn > 1 and spec.conversation_id in previous:
            expected = previous[spec.conversation_id]
            if response.get("previous_chat_id") != expected:
                verdict.fail(
                    f"{spec.request_id}: continued from {response.get('previous_chat_id')}, "
                    f"expected the previous turn's chat {expected}"
                )
        previous[spec.conversation_id] = response["chat_id"]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (which need not be sorted); 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]
