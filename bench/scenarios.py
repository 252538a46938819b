"""The two scenarios, their defaults, and the targets each is judged by."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bench.procs import Pacing
from worker.config import setting_default

#: Both loads run on the worker's default topic layout.
DEFAULT_PARTITIONS: int = setting_default("topic_partitions")


@dataclass(frozen=True)
class Scenario:
    """One load: its size, the simulator's pacing, the topic layout and the baseline's slice."""

    name: str
    requests: int
    conversations: int
    reply_tokens: int
    inter_token_delay_ms: float
    first_token_latency_ms: float
    partitions: int
    baseline_fraction: float

    @property
    def pacing(self) -> Pacing:
        return Pacing(self.reply_tokens, self.first_token_latency_ms, self.inter_token_delay_ms)

    @property
    def offered_deltas_per_s(self) -> float | None:
        """Deltas per second the simulator offers when every conversation streams at once."""
        if self.inter_token_delay_ms <= 0:
            return None
        return min(self.conversations, self.requests) * 1000 / self.inter_token_delay_ms

    def describe(self) -> str:
        offered = self.offered_deltas_per_s
        pace = (
            f"{self.inter_token_delay_ms:g} ms between tokens (~{offered:,.0f} deltas/s offered)"
            if offered
            else "no delay between tokens (as fast as the simulator can)"
        )
        return (
            f"{self.requests} requests over {self.conversations} conversations, "
            f"{self.reply_tokens} deltas per reply, {pace}, first token after "
            f"{self.first_token_latency_ms:g} ms, {self.partitions} partitions, baseline on "
            f"{self.baseline_fraction:.0%} of the conversations"
        )

    def with_overrides(self, overrides: dict[str, Any]) -> Scenario:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


#: ~200 streams at once, each a delta every 50 ms: ~4,000 deltas/s offered, 2 turns each.
PACED = Scenario(
    name="paced",
    requests=400,
    conversations=200,
    reply_tokens=100,
    inter_token_delay_ms=50,
    first_token_latency_ms=100,
    partitions=DEFAULT_PARTITIONS,
    baseline_fraction=0.02,
)
#: The simulator streams as fast as it can: the worker's delta throughput is what is measured.
FAST = Scenario(
    name="fast",
    requests=1000,
    conversations=200,
    reply_tokens=100,
    inter_token_delay_ms=0,
    first_token_latency_ms=0,
    partitions=DEFAULT_PARTITIONS,
    baseline_fraction=0.02,
)
#: Run once, untimed, on a broker the bench started (``bench.run.warm_up``).
WARM_UP = replace(FAST, name="warm-up", requests=200, conversations=100, reply_tokens=50)
SCENARIOS = {s.name: s for s in (PACED, FAST)}

#: ``--quick``: a smoke run of the same machinery in a few seconds per system.
QUICK = {
    "paced": replace(PACED, requests=40, conversations=20, reply_tokens=20, baseline_fraction=0.1),
    "fast": replace(FAST, requests=100, conversations=20, reply_tokens=20, baseline_fraction=0.1),
}

# Targets (issue 3).
PACED_MIN_PEAK_STREAMS = 150
PACED_MIN_REQUEST_RATE_RATIO = 50.0
PACED_MAX_P99_MS = 100.0
FAST_MIN_CEILING_SHARE = 0.30
