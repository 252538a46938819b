"""The simulator's settings (re-exported by ``worker.simulator.server``, where callers import it).

Durations carry their unit; per-call ``[[sim:pace ...]]`` directives override the pacing fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.config import setting_default
from worker.simulator.faults import FaultRule


@dataclass
class SimulatorConfig:
    """How the simulated Vapi behaves when a call does not say otherwise.

    The key and the pacing default to the ``SIMULATOR_*`` settings' defaults (the embedded
    simulator's), so that ``vapi-worker simulator`` and the embedded one behave alike.
    """

    api_key: str = setting_default("simulator_api_key").get_secret_value()
    first_token_latency_s: float = setting_default("simulator_first_token_latency_s")
    inter_token_delay_s: float = setting_default("simulator_inter_token_delay_s")
    reply_tokens: int = 20  # length of the generic reply, in tokens (a word plus its space)
    done_marker: bool = False  # also send `data: [DONE]` before closing
    record_delta_times: bool = False  # keep time.time() of every delta write, for benchmarks
    faults: list[FaultRule] = field(default_factory=list)
    #: The organisation's limit on chats answered at once (0: none): a call over it gets a 429
    #: with ``Retry-After: max_chats_retry_after_s``, like Vapi's concurrency limit.
    max_chats: int = 0
    max_chats_retry_after_s: float = 1.0
