"""Delta coalescing: held text is released by size, by age, and at the end, nothing lost."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.coalescing import DeltaCoalescer

pytestmark = pytest.mark.unit


def test_text_is_released_once_it_reaches_the_size_limit() -> None:
    """Text is held until max_chars is reached, then released as one piece."""
    coalescer = DeltaCoalescer(max_chars=10)
    assert coalescer.add("Hello", 0.0) is None
    assert coalescer.add(", wor", 0.0) == "Hello, wor"
    assert coalescer.flush() is None


def test_text_is_due_by_age_from_its_oldest_part() -> None:
    """The age limit counts from the first held part, not the latest."""
    coalescer = DeltaCoalescer(max_delay_s=0.1)
    assert coalescer.due_in(0.0) is None
    assert coalescer.add("a", 1.0) is None
    assert coalescer.add("b", 1.06) is None
    assert coalescer.due_in(1.06) == pytest.approx(0.04)
    assert coalescer.add("c", 1.1) == "abc"
    assert coalescer.due_in(1.2) is None


def test_a_coalescer_without_limits_is_refused() -> None:
    """Neither a size nor an age limit is a configuration error, not a silent pass-through."""
    with pytest.raises(ValueError, match="max_chars"):
        DeltaCoalescer()


@given(
    parts=st.lists(st.text(max_size=8), max_size=40),
    max_chars=st.integers(min_value=0, max_value=30),
    gaps=st.lists(st.floats(min_value=0, max_value=0.05), min_size=40, max_size=40),
)
def test_released_pieces_concatenate_to_the_input(
    parts: list[str], max_chars: int, gaps: list[float]
) -> None:
    """Whatever the limits and timing, released pieces plus the final flush are the input."""
    coalescer = DeltaCoalescer(max_chars=max_chars, max_delay_s=0.03)
    out: list[str] = []
    now = 0.0
    for part, gap in zip(parts, gaps, strict=False):
        now += gap
        released = coalescer.add(part, now)
        if released is not None:
            out.append(released)
            if max_chars:
                assert len(released) >= max_chars or coalescer.due_in(now) is None
    tail = coalescer.flush()
    if tail is not None:
        out.append(tail)
    assert "".join(out) == "".join(parts)
