"""The simulator's settings (re-exported by ``worker.simulator.server``, where callers import it).

Durations carry their unit; per-call ``[[sim:pace ...]]`` directives override the pacing fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.simulator.faults import FaultRule


@dataclass
class SimulatorConfig:
    """How the simulated Vapi behaves when a call does not say otherwise."""

    api_key: str = "sim-key"
    first_token_latency_s: float = 0.2
    inter_token_delay_s: float = 0.03
    reply_tokens: int = 20  # length of the generic reply, in tokens (a word plus its space)
    done_marker: bool = False  # also send `data: [DONE]` before closing
    record_delta_times: bool = False  # keep time.time() of every delta write, for benchmarks
    faults: list[FaultRule] = field(default_factory=list)
    #: The organisation's limit on chats answered at once (0: none): a call over it gets a 429
    #: with ``Retry-After: max_chats_retry_after_s``, like Vapi's concurrency limit.
    max_chats: int = 0
    max_chats_retry_after_s: float = 1.0
