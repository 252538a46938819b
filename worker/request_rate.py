"""When the next Vapi call may start under a requests-per-minute limit: pure, no clock of its own.

The generic cell rate algorithm in its virtual-scheduling form (ITU-T I.371): calls are spaced
``60 / per_minute`` seconds apart. Each caller reserves the next free moment and waits until it;
a caller that comes after an idle spell goes at once. So over any window of ``T`` seconds at most
``1 + T * per_minute / 60`` calls start: no burst beyond one call, and a waiter that wakes late
loses nothing (the schedule, not the wake-up, sets the next moment).

A rate of ``None`` means no limit; a rate of 0 admits nothing (``math.inf``).
"""

from __future__ import annotations

import math

__all__ = ["RequestRate"]


class RequestRate:
    """Spaces calls out to at most ``per_minute`` a minute, on the caller's monotonic seconds."""

    __slots__ = ("_next", "_per_minute")

    def __init__(self, per_minute: float | None = None) -> None:
        self._per_minute: float | None = None
        self._next = -math.inf
        self.set_rate(per_minute)

    @property
    def per_minute(self) -> float | None:
        """The rate in force; None when unlimited."""
        return self._per_minute

    def set_rate(self, per_minute: float | None) -> None:
        """A new rate for calls reserved from now on (reservations already made stand)."""
        if per_minute is not None and (per_minute < 0 or not math.isfinite(per_minute)):
            raise ValueError(f"per_minute must be a finite number >= 0, got {per_minute}")
        self._per_minute = per_minute

    def reserve(self, now: float) -> float:
        """Reserve the next start; returns the seconds to wait for it (``math.inf``: never)."""
        if self._per_minute is None:
            return 0.0
        if self._per_minute == 0:
            return math.inf
        start = max(now, self._next)
        self._next = start + 60.0 / self._per_minute
        return start - now
