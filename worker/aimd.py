"""How many requests a worker runs at once while Vapi answers 429: AIMD, pure, no clock of its own.

Why: replicas share one Vapi organisation and do not talk to each other. A fixed share can still be
too much (the organisation's real limit is lower than configured, or other clients use it too), so
each replica adapts the way TCP does: a 429 halves its limit (multiplicative decrease), and every
``limit`` successful calls in a row of a calm period raise it by one (additive increase), up to
the ceiling (its fleet share, at most ``WORKER_MAX_IN_FLIGHT``). Replicas that each follow this
converge on a fair split of what Vapi accepts without exchanging a word (Chiu and Jain, 1989).

Rules:

* One decrease per congestion signal: a 429 of a call that started before the last decrease was
  sent under the old limit and is already answered by it, so it changes nothing.
* ``Retry-After`` is honoured: no increase until the pause it asked for is over.
* The limit never goes below 1 (a replica with a share always makes progress) nor above the
  ceiling; a ceiling of 0 means 0.
* A new ceiling (a rebalance changed the share): a limit at the old ceiling follows the new one;
  a limit cut by 429s stays where it is, unless the new ceiling is lower.

Times are the caller's monotonic seconds.
"""

from __future__ import annotations

import math

__all__ = ["AimdLimit"]


class AimdLimit:
    """One worker's concurrency limit under additive increase, multiplicative decrease."""

    __slots__ = ("_calm_from", "_ceiling", "_decrease", "_last_decrease", "_limit", "_successes")

    def __init__(self, ceiling: int, *, decrease: float = 0.5) -> None:
        if ceiling < 0:
            raise ValueError(f"ceiling must be >= 0, got {ceiling}")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be between 0 and 1, got {decrease}")
        self._ceiling = ceiling
        self._limit = float(ceiling)
        self._decrease = decrease
        self._last_decrease = -math.inf
        self._calm_from = -math.inf
        self._successes = 0

    @property
    def limit(self) -> int:
        """Requests that may run at once now."""
        return min(self._ceiling, max(1, math.floor(self._limit)))

    @property
    def ceiling(self) -> int:
        """The highest the limit may go."""
        return self._ceiling

    def set_ceiling(self, ceiling: int) -> None:
        """A new highest limit (the share after a rebalance)."""
        if ceiling < 0:
            raise ValueError(f"ceiling must be >= 0, got {ceiling}")
        at_ceiling = self._limit >= self._ceiling
        self._ceiling = ceiling
        self._limit = float(ceiling) if at_ceiling else min(self._limit, float(ceiling))

    def rate_limited(self, *, started_at: float, now: float, pause_s: float) -> bool:
        """A call started at ``started_at`` got a 429 asking for ``pause_s``; True: limit cut."""
        self._calm_from = max(self._calm_from, now + max(pause_s, 0.0))
        self._successes = 0
        if started_at < self._last_decrease:
            return False
        self._limit = max(1.0, min(self._limit, float(self._ceiling)) * self._decrease)
        self._last_decrease = now
        return True

    def succeeded(self, *, now: float) -> bool:
        """A call went through; True if this raised the limit."""
        if now < self._calm_from or self._limit >= self._ceiling:
            return False
        self._successes += 1
        if self._successes < self.limit:
            return False
        self._successes = 0
        self._limit = min(float(self._ceiling), math.floor(self._limit) + 1.0)
        return True
