"""Polls a worker's ``/healthz`` and ``/readyz`` as the kubelet would, and sums up what it saw.

``Prober`` asks each path every ``interval_s`` on a new connection (the kubelet opens one per
probe), from the worker's start until stopped, and keeps every answer: its status, or
``refused`` (nothing listens yet), ``timeout`` (no answer within ``timeout_s``) or ``error``.
``summarize`` is the pure part: status counts, latency percentiles, when the path first answered
200, and how long, after that, it failed for at most in a row, where an answer slower than the
probe's timeout counts as a failure, as it does for the kubelet.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

REFUSED = "refused"
TIMEOUT = "timeout"
ERROR = "error"


@dataclass(frozen=True, slots=True)
class Sample:
    """One poll: when it started (s since the worker's start), what came back, how long it took."""

    at_s: float
    status: int | str
    latency_s: float


@dataclass(frozen=True, slots=True)
class ProbeSummary:
    """What one path answered over a run."""

    path: str
    polls: int
    #: Status code (as text), ``refused``, ``timeout`` or ``error``: how many polls got it.
    statuses: dict[str, int]
    #: Latencies of the polls that reached the server (answered or timed out), in ms.
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    #: When the slowest of them started (s since the worker's start).
    slowest_at_s: float | None
    #: Polls that reached the server and took longer than the probe timeout (or timed out).
    slower_than_timeout: int
    #: When the path first answered 200 within the probe timeout; None: never.
    first_ok_s: float | None
    #: After ``first_ok_s``: the longest span from a failing poll to the next passing one.
    longest_failing_s: float = 0.0
    #: After ``first_ok_s``: the most failing polls in a row.
    most_failures_in_row: int = 0


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values`` (not empty), ``fraction`` in (0, 1]."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def passed(sample: Sample, timeout_s: float) -> bool:
    """What the kubelet makes of one answer: 2xx or 3xx, within the probe's timeout."""
    return (
        isinstance(sample.status, int)
        and 200 <= sample.status < 400
        and sample.latency_s <= timeout_s
    )


def summarize(path: str, samples: Sequence[Sample], probe_timeout_s: float) -> ProbeSummary:
    """Sum up the polls of one path, judged against a probe timeout of ``probe_timeout_s``."""
    ordered = sorted(samples, key=lambda s: s.at_s)
    statuses = Counter(str(s.status) for s in ordered)
    reached_samples = [s for s in ordered if s.status not in (REFUSED, ERROR)]
    reached = [s.latency_s for s in reached_samples]
    slowest = max(reached_samples, key=lambda s: s.latency_s, default=None)
    first_ok = next((s.at_s for s in ordered if passed(s, probe_timeout_s)), None)
    longest, most, run, failing_since = 0.0, 0, 0, None
    if first_ok is not None:
        for sample in ordered:
            if sample.at_s < first_ok:
                continue
            if passed(sample, probe_timeout_s):
                if failing_since is not None:
                    longest = max(longest, sample.at_s - failing_since)
                failing_since, run = None, 0
                continue
            if failing_since is None:
                failing_since = sample.at_s
            run += 1
            most = max(most, run)
        if failing_since is not None:  # still failing at the end
            last = ordered[-1]
            longest = max(longest, last.at_s + last.latency_s - failing_since)

    def ms(value: float) -> float:
        return round(value * 1000, 1)

    return ProbeSummary(
        path=path,
        polls=len(ordered),
        statuses=dict(sorted(statuses.items())),
        p50_ms=ms(percentile(reached, 0.50)) if reached else None,
        p99_ms=ms(percentile(reached, 0.99)) if reached else None,
        max_ms=ms(max(reached)) if reached else None,
        slowest_at_s=None if slowest is None else round(slowest.at_s, 2),
        slower_than_timeout=sum(1 for latency in reached if latency > probe_timeout_s),
        first_ok_s=None if first_ok is None else round(first_ok, 2),
        longest_failing_s=round(longest, 2),
        most_failures_in_row=most,
    )


class Prober:
    """Polls ``paths`` of ``base_url`` every ``interval_s`` until ``stop()``."""

    def __init__(
        self,
        base_url: str,
        paths: Sequence[str] = ("/healthz", "/readyz"),
        *,
        interval_s: float = 0.15,
        timeout_s: float = 10.0,
    ) -> None:
        self._base_url = base_url
        self._paths = list(paths)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self.samples: dict[str, list[Sample]] = {path: [] for path in self._paths}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = 0.0

    def start(self, started: float) -> None:
        """Begin polling; ``started`` is the worker's start (``time.monotonic()``)."""
        self._started = started
        self._tasks = [asyncio.create_task(self._poll(path)) for path in self._paths]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self, path: str) -> None:
        # No kept-alive connections: each poll connects anew, as the kubelet's probes do.
        limits = httpx.Limits(max_keepalive_connections=0)
        timeout = httpx.Timeout(self._timeout_s)
        async with httpx.AsyncClient(
            base_url=self._base_url, limits=limits, timeout=timeout
        ) as http:
            while True:
                begun = time.monotonic()
                status: int | str
                try:
                    status = (await http.get(path)).status_code
                except httpx.ConnectError:
                    status = REFUSED
                except httpx.TimeoutException:
                    status = TIMEOUT
                except httpx.HTTPError:
                    status = ERROR
                ended = time.monotonic()
                self.samples[path].append(Sample(begun - self._started, status, ended - begun))
                await asyncio.sleep(max(0.0, self._interval_s - (ended - begun)))

    def summaries(self, probe_timeout_s: float) -> list[ProbeSummary]:
        return [summarize(path, self.samples[path], probe_timeout_s) for path in self._paths]
