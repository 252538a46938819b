"""The worker's limits on Vapi calls, kept in force: its fleet share, AIMD after 429s, the RPM gate.

Why here: the arithmetic is pure (``worker.fleet_shares``, ``worker.aimd``,
``worker.request_rate``); this module applies it. It hears of every rebalance (the request
partitions the worker now owns), of every call's start and end (``LimitedVapiClient`` wraps the
Vapi client), and hands the resulting concurrency limit to whoever runs the requests (the
dispatcher's scheduler). Rules:

* Streams: the worker runs at most ``min(WORKER_MAX_IN_FLIGHT, share of
  VAPI_GLOBAL_MAX_IN_FLIGHT, AIMD limit)`` requests at once; a request holds its slot from start to
  final response, so it has at most one Vapi stream open for all of that time. The share is
  recomputed on every assignment. A rebalance revokes every partition of every replica before any
  is assigned again (aiokafka's eager protocol), and a revocation ends the worker's requests
  (``Dispatcher.release``): streams of the old shares are closed before the new shares apply.
* Requests per minute: every Vapi call (every attempt) first waits for its start in this worker's
  share of VAPI_GLOBAL_REQUESTS_PER_MINUTE (``RequestRate``). The wait happens inside the
  request's slot: the key's order is untouched (the request is its key's head already), and a
  release cancels the wait like any other step of a running request.
* 429: the call's start time and the (capped) ``Retry-After`` go to the AIMD limit; a normal end
  of a stream counts as a success.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import Any

import structlog

from worker.aimd import AimdLimit
from worker.errors import VapiRateLimitedError
from worker.fleet_shares import rate_share, stream_share
from worker.metrics import WorkerMetrics
from worker.pipeline import ChatStreamer
from worker.request_rate import RequestRate
from worker.vapi.events import StreamDelta

log = structlog.get_logger(__name__)

#: How often a call waits again while this worker has no requests-per-minute share at all.
NO_SHARE_RECHECK_S = 1.0


class FleetLimits:
    """One worker's limits on Vapi calls (see the module docstring)."""

    def __init__(
        self,
        *,
        local_max_in_flight: int,
        global_max_in_flight: int,
        global_requests_per_minute: float,
        retry_after_max_s: float,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._local_max = local_max_in_flight
        self._global_max = global_max_in_flight
        self._global_rpm = global_requests_per_minute
        self._retry_after_max_s = retry_after_max_s
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._aimd = AimdLimit(local_max_in_flight)
        self._rate = RequestRate(None)
        self._applied = self._aimd.limit
        self._on_limit: Callable[[int], None] | None = None
        metrics.concurrency_limit.set(self._applied)

    @property
    def limit(self) -> int:
        """Requests this worker may run at once now."""
        return self._aimd.limit

    def on_limit(self, apply: Callable[[int], None]) -> None:
        """Call ``apply`` with the concurrency limit now and whenever it changes."""
        self._on_limit = apply
        apply(self._applied)

    def assign(self, owned: Iterable[int], partitions: int) -> None:
        """The worker now owns request partitions ``owned`` of ``partitions``: new shares."""
        owned = set(owned)
        if self._global_max > 0:
            share = stream_share(self._global_max, owned, partitions)
            self._metrics.fleet_stream_share.set(share)
            self._aimd.set_ceiling(min(self._local_max, share))
            if share == 0 and owned:
                log.error(
                    "this worker's share of VAPI_GLOBAL_MAX_IN_FLIGHT is 0: its partitions wait "
                    "until a rebalance gives it more; raise the limit to at least the partitions",
                    global_max_in_flight=self._global_max,
                    partitions=partitions,
                    owned=sorted(owned),
                )
        if self._global_rpm > 0:
            per_minute = rate_share(self._global_rpm, owned, partitions)
            self._metrics.fleet_requests_per_minute_share.set(per_minute)
            self._rate.set_rate(per_minute)
        log.info(
            "fleet shares set",
            owned_partitions=len(owned),
            partitions=partitions,
            concurrency_limit=self._aimd.limit,
            requests_per_minute=self._rate.per_minute,
        )
        self._apply()

    async def before_call(self) -> float:
        """Wait for this call's start under the requests-per-minute share; returns that start."""
        while True:
            delay = self._rate.reserve(self._clock())
            if delay != math.inf:
                break
            await self._sleep(NO_SHARE_RECHECK_S)
        if delay > 0:
            await self._sleep(delay)
        return self._clock()

    def rate_limited(self, started_at: float, retry_after_s: float | None) -> None:
        """A call started at ``started_at`` got a 429."""
        pause = min(retry_after_s or 0.0, self._retry_after_max_s)
        if self._aimd.rate_limited(started_at=started_at, now=self._clock(), pause_s=pause):
            log.warning("Vapi answered 429: concurrency limit cut", concurrency_limit=self.limit)
            self._apply()

    def succeeded(self) -> None:
        """A call's stream ended normally."""
        if self._aimd.succeeded(now=self._clock()):
            self._apply()

    def _apply(self) -> None:
        limit = self._aimd.limit
        if limit == self._applied:
            return
        self._applied = limit
        self._metrics.concurrency_limit.set(limit)
        if self._on_limit is not None:
            self._on_limit(limit)


class LimitedVapiClient:
    """A Vapi client whose calls wait for their start and report how they ended to the limits."""

    def __init__(self, client: ChatStreamer, limits: FleetLimits) -> None:
        self._client = client
        self._limits = limits

    async def stream_chat(
        self, body: dict[str, object], *, request_id: str, attempt: int
    ) -> AsyncGenerator[StreamDelta, None]:
        started_at = await self._limits.before_call()
        stream = self._client.stream_chat(body, request_id=request_id, attempt=attempt)
        try:
            async with contextlib.aclosing(stream):
                async for event in stream:
                    yield event
        except VapiRateLimitedError as err:
            self._limits.rate_limited(started_at, err.retry_after_s)
            raise
        self._limits.succeeded()


def follow_assignments(app: Any, limits: FleetLimits, topic: str, configured: int) -> None:
    """Recompute ``limits``' shares from every assignment Faust makes (its full assignment).

    The request topic's partition count is the consumer's metadata; ``configured``
    (TOPIC_PARTITIONS) stands in only while that is unknown, raised to cover every partition owned.
    """

    async def on_assigned(_app: Any, assigned: Iterable[Any] = (), **_kwargs: Any) -> None:
        owned = {tp.partition for tp in assigned if tp.topic == topic}
        partitions = app.consumer.topic_partitions(topic)
        if not partitions:
            partitions = max([configured, *(p + 1 for p in owned)])
            log.warning("request topic's partition count unknown", assumed=partitions)
        limits.assign(owned, partitions)

    app.on_partitions_assigned.connect(on_assigned)
