"""Delta coalescing (off by default): fewer, larger delta records for chatty streams.

An LLM stream can send a record per word; a UI does not need more than a few updates per second.
With coalescing on, a request's text is held until it is ``max_chars`` long or its oldest part has
waited ``max_delay_s``, then published as one delta. ``seq`` stays gap-free per attempt because the
publisher numbers what this class releases, not what Vapi sent. Pure: the caller owns the clock.
"""

from __future__ import annotations


class DeltaCoalescer:
    """Accumulates delta text and says when it is due."""

    __slots__ = ("_max_chars", "_max_delay_s", "_parts", "_since", "_size")

    def __init__(self, *, max_chars: int = 0, max_delay_s: float = 0.0) -> None:
        if max_chars <= 0 and max_delay_s <= 0:
            raise ValueError("a coalescer needs max_chars > 0 or max_delay_s > 0")
        self._max_chars = max_chars
        self._max_delay_s = max_delay_s
        self._parts: list[str] = []
        self._size = 0
        self._since: float | None = None

    def add(self, text: str, now: float) -> str | None:
        """Take ``text``; return the held text when it is now due, else None."""
        if not self._parts:
            self._since = now
        self._parts.append(text)
        self._size += len(text)
        if self._max_chars > 0 and self._size >= self._max_chars:
            return self.flush()
        if self.due_in(now) == 0.0:
            return self.flush()
        return None

    def due_in(self, now: float) -> float | None:
        """Seconds until the held text is due by age; None if nothing is held or no age limit."""
        if self._since is None or self._max_delay_s <= 0:
            return None
        return max(0.0, self._since + self._max_delay_s - now)

    def flush(self) -> str | None:
        """Release everything held (None when nothing is)."""
        if not self._parts:
            return None
        text = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._since = None
        return text
