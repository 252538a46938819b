"""When a table recovery has stopped making progress: the rule, without any I/O.

While Faust recovers a table it keeps the worker's request partitions paused, and ``/healthz``
stays 200 (a large table may take minutes), so a recovery that no longer reads anything would
hold those requests forever. What is timed is progress, never duration: a recovery progresses
when it starts anew, when the records it still has to read go down, or when the set of changelog
partitions it reads changes (a rebalance). Remaining records that go up (the partition's end
read again) are no progress; the next look that finds fewer than the one before is. A recovery
that still has records to read and has not progressed for ``stall_s`` seconds is stalled. One
with nothing left to read is Faust's to end and never counts as stalled; outside a recovery
nothing is timed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Stall:
    """A recovery with records still to read and no progress for ``seconds``."""

    #: Each changelog partition with records still to read, and how many.
    remaining: Mapping[str, int]
    #: Seconds since the recovery last progressed (or started).
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.remaining.values())


class RecoveryWatch:
    """Reports a :class:`Stall` once a recovery has not progressed for ``stall_s`` seconds.

    ``stall_s == 0`` turns it off. Feed it with :meth:`observe` every few seconds.
    """

    def __init__(self, stall_s: float) -> None:
        if stall_s < 0:
            raise ValueError("stall_s must be > 0, or 0 to turn the watch off")
        self.stall_s = stall_s
        self._started: object = None
        self._partitions: frozenset[str] | None = None
        self._last_total = 0
        self._progress_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.stall_s > 0

    def observe(
        self,
        now: float,
        in_recovery: bool,
        remaining: Mapping[str, int],
        started: object = None,
    ) -> Stall | None:
        """Take one look at the recovery; a :class:`Stall` if it is stalled.

        ``now`` is a monotonic time in seconds; ``remaining`` maps each active changelog
        partition to the records still to read; ``started`` identifies the recovery under way
        (its start time, say): a different value is a new recovery, which is progress.
        """
        if not self.enabled or not in_recovery:
            self._partitions = None
            return None
        partitions = frozenset(remaining)
        total = sum(max(0, n) for n in remaining.values())
        if self._partitions is None or partitions != self._partitions or started != self._started:
            self._restart(now, partitions, total, started)
            return None
        went_down = total < self._last_total
        self._last_total = total
        if went_down:
            self._progress_at = now
            return None
        left = {tp: n for tp, n in remaining.items() if n > 0}
        waited = now - self._progress_at
        if not left or waited < self.stall_s:
            return None
        return Stall(remaining=dict(sorted(left.items())), seconds=waited)

    def _restart(self, now: float, partitions: frozenset[str], total: int, started: object) -> None:
        self._partitions = partitions
        self._started = started
        self._last_total = total
        self._progress_at = now
