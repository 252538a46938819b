"""Unit tests of worker.scheduler: per-key order, the in-flight bound, commit safety, revoke."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from worker.scheduler import Completion, KeyOrderedScheduler, Ticket

pytestmark = pytest.mark.unit


def offsets(tickets: list[Ticket[str]]) -> list[int]:
    """The offsets of ``tickets``, in order."""
    return [ticket.offset for ticket in tickets]


def only(tickets: list[Ticket[str]]) -> Ticket[str]:
    """The one ticket of a list that must hold exactly one."""
    assert len(tickets) == 1, tickets
    return tickets[0]


# Example tests, one per rule.


def test_same_key_runs_one_at_a_time_in_offset_order() -> None:
    """A key's second record starts only when its first completes."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=8, max_buffered=8)
    first = only(sched.submit("p", 0, "conv", "turn 1"))
    assert sched.submit("p", 1, "conv", "turn 2") == []
    assert sched.submit("p", 2, "conv", "turn 3") == []
    assert (sched.running, sched.waiting) == (1, 2)
    second = only(sched.complete(first).start)
    assert (second.offset, second.item) == (1, "turn 2")
    third = only(sched.complete(second).start)
    assert third.offset == 2
    assert sched.complete(third).start == []


def test_same_key_on_different_partitions_is_not_ordered() -> None:
    """The ordering key is (partition, key), so one key on two partitions runs twice at once."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=8, max_buffered=8)
    assert offsets(sched.submit("p0", 0, "conv", "x")) == [0]
    assert offsets(sched.submit("p1", 0, "conv", "y")) == [0]
    assert sched.running == 2


def test_different_keys_run_concurrently() -> None:
    """Records of different keys start at once, and a slow one does not hold the others back."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=8, max_buffered=8)
    slow = only(sched.submit("p", 0, "a", "slow"))
    fast = only(sched.submit("p", 1, "b", "fast"))
    only(sched.submit("p", 2, "c", "other"))
    assert sched.running == 3
    assert sched.complete(fast) == Completion(start=[], ack=[])
    assert only(sched.submit("p", 3, "b", "next of b")).offset == 3
    assert sched.complete(slow).ack == [("p", 0), ("p", 1)]


def test_running_is_bounded_by_max_in_flight() -> None:
    """With every slot taken, a record of an idle key waits until a slot is freed."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=2, max_buffered=8)
    a = only(sched.submit("p", 0, "a", "a"))
    only(sched.submit("p", 1, "b", "b"))
    assert sched.submit("p", 2, "c", "c") == []
    assert (sched.running, sched.waiting, sched.buffered) == (2, 1, 3)
    assert offsets(sched.complete(a).start) == [2]
    assert sched.running == 2


def test_slots_go_to_waiting_records_in_submission_order() -> None:
    """Records waiting for a slot get one first come, first served."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=1, max_buffered=8)
    first = only(sched.submit("p0", 0, "a", "a"))
    assert sched.submit("p1", 0, "b", "b") == []
    assert sched.submit("p0", 1, "c", "c") == []
    assert sched.submit("p1", 1, "d", "d") == []
    started = []
    ticket = first
    for _ in range(3):
        ticket = only(sched.complete(ticket).start)
        started.append((ticket.partition, ticket.offset))
    assert started == [("p1", 0), ("p0", 1), ("p1", 1)]


def test_next_record_of_a_key_is_not_overtaken_by_later_records() -> None:
    """When a key's record finishes, its successor outranks waiting records submitted after it."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=1, max_buffered=8)
    a0 = only(sched.submit("p", 0, "a", "a0"))
    assert sched.submit("p", 1, "a", "a1") == []
    assert sched.submit("p", 2, "b", "b0") == []
    a1 = only(sched.complete(a0).start)
    assert a1.offset == 1
    assert offsets(sched.complete(a1).start) == [2]


def test_acks_only_the_leading_run_of_finished_offsets() -> None:
    """Finished records behind an unfinished one are acked only once it finishes, in order."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=8, max_buffered=8)
    t0, t1, t2, t3 = (only(sched.submit("p", n, f"k{n}", str(n))) for n in range(4))
    assert sched.complete(t2).ack == []
    assert sched.complete(t1).ack == []
    assert sched.pending_offsets("p") == 0
    assert sched.complete(t0).ack == [("p", 0), ("p", 1), ("p", 2)]
    assert sched.pending_offsets("p") == 3
    assert sched.complete(t3).ack == [("p", 3)]
    assert sched.pending_offsets("p") is None


def test_acks_follow_the_taken_offsets_across_gaps() -> None:
    """Offsets missing from the partition (compaction, transaction markers) do not stop acks."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=8, max_buffered=8)
    t5 = only(sched.submit("p", 5, "a", "x"))
    t9 = only(sched.submit("p", 9, "b", "y"))
    assert sched.complete(t9).ack == []
    assert sched.complete(t5).ack == [("p", 5), ("p", 9)]


def test_acks_are_tracked_per_partition() -> None:
    """An unfinished record holds back acks of its own partition only."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=8, max_buffered=8)
    only(sched.submit("p0", 0, "a", "slow"))
    t1 = only(sched.submit("p0", 1, "b", "x"))
    other = only(sched.submit("p1", 7, "a", "y"))
    assert sched.complete(t1).ack == []
    assert sched.complete(other).ack == [("p1", 7)]


def test_records_without_key_run_concurrently_and_count_against_the_bound() -> None:
    """Records with key None are never ordered against each other but do take slots."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=2, max_buffered=8)
    n0 = only(sched.submit("p", 0, None, "invalid 1"))
    only(sched.submit("p", 1, None, "invalid 2"))
    assert sched.submit("p", 2, "a", "valid") == []
    completion = sched.complete(n0)
    assert completion.ack == [("p", 0)]
    assert offsets(completion.start) == [2]


def test_capacity_counts_taken_and_unfinished_records() -> None:
    """``has_capacity`` is false at max_buffered running or waiting records, true after a finish."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=1, max_buffered=3)
    t0 = only(sched.submit("p", 0, "a", "x"))
    sched.submit("p", 1, "b", "y")
    assert sched.has_capacity
    sched.submit("p", 2, "a", "z")
    assert (sched.has_capacity, sched.buffered, sched.running, sched.waiting) == (False, 3, 1, 2)
    assert offsets(sched.complete(t0).start) == [1]
    assert (sched.has_capacity, sched.buffered, sched.unacked) == (True, 2, 2)


def test_finished_records_held_back_leave_buffered_but_stay_unacked() -> None:
    """A finished record behind an unfinished one frees capacity but still counts as unacked."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=2, max_buffered=2)
    only(sched.submit("p", 0, "a", "slow"))
    t1 = only(sched.submit("p", 1, "b", "fast"))
    assert not sched.has_capacity
    assert sched.complete(t1).ack == []
    assert (sched.has_capacity, sched.buffered, sched.unacked) == (True, 1, 2)


def test_revoke_returns_running_tickets_and_drops_waiting_ones() -> None:
    """Revoking a partition hands back its running tickets and forgets everything else of it."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=2, max_buffered=8)
    a = only(sched.submit("p0", 0, "a", "a"))
    b = only(sched.submit("p0", 1, "b", "b"))
    sched.submit("p0", 2, "a", "blocked behind a")
    sched.submit("p0", 3, "c", "waiting for a slot")
    keep = sched.submit("p1", 0, "a", "other partition")
    assert keep == []
    cancelled = sched.revoke(["p0"])
    assert len(cancelled) == 2
    assert cancelled[0] is a
    assert cancelled[1] is b
    assert (sched.buffered, sched.running, sched.unacked) == (1, 0, 1)
    assert sched.pending_offsets("p0") is None
    assert sched.pending_offsets("p1") == 0


def test_a_key_is_pending_while_a_record_of_it_runs_or_waits() -> None:
    """What expiry asks before deleting a conversation: running, waiting for a slot, or blocked
    behind its own running record all count; a finished, unacked one does not."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=1, max_buffered=8)
    assert not sched.has_pending("p0", "a")
    a = only(sched.submit("p0", 0, "a", "running"))
    sched.submit("p0", 1, "b", "waiting for a slot")
    sched.submit("p0", 2, "a", "blocked behind a")
    assert sched.has_pending("p0", "a")
    assert sched.has_pending("p0", "b")
    assert not sched.has_pending("p1", "a")  # another partition's key of the same name
    b = only(sched.complete(a).start)
    assert sched.has_pending("p0", "a")  # its second record still waits
    a2 = only(sched.complete(b).start)
    assert not sched.has_pending("p0", "b")
    sched.complete(a2)
    assert not sched.has_pending("p0", "a")
    sched.submit("p0", 3, "c", "revoked")
    sched.revoke(["p0"])
    assert not sched.has_pending("p0", "c")


def test_complete_after_revoke_is_ignored() -> None:
    """Completing a revoked ticket, even twice, returns nothing and changes no count."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=2, max_buffered=8)
    a = only(sched.submit("p0", 0, "a", "a"))
    other = only(sched.submit("p1", 0, "a", "b"))
    sched.revoke(["p0"])
    for _ in range(2):
        assert sched.complete(a) == Completion(start=[], ack=[])
        assert (sched.running, sched.buffered) == (1, 1)
    assert sched.complete(other).ack == [("p1", 0)]


def test_ticket_from_before_a_revoke_does_not_complete_the_redelivered_record() -> None:
    """After a partition comes back, an old ticket for the same offset is ignored, not confused."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=2, max_buffered=8)
    old = only(sched.submit("p", 0, "a", "first delivery"))
    sched.revoke(["p"])
    new = only(sched.submit("p", 0, "a", "redelivery"))
    assert sched.complete(old) == Completion(start=[], ack=[])
    assert sched.running == 1
    assert sched.complete(new).ack == [("p", 0)]


def test_complete_also_fills_slots_freed_by_revoke() -> None:
    """Slots of revoked running tickets go to other partitions' waiting records at a complete."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=3, max_buffered=8)
    only(sched.submit("p0", 0, "a", "revoked"))
    only(sched.submit("p0", 1, "b", "revoked"))
    survivor = only(sched.submit("p1", 0, "a", "runs"))
    assert sched.submit("p1", 1, "b", "waits") == []
    assert sched.submit("p1", 2, "c", "waits") == []
    sched.revoke(["p0"])
    assert offsets(sched.complete(survivor).start) == [1, 2]


def test_revoking_an_unknown_partition_changes_nothing() -> None:
    """Revoking a partition the scheduler never saw returns no tickets."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=1, max_buffered=8)
    only(sched.submit("p0", 0, "a", "x"))
    assert sched.revoke(["p9"]) == []
    assert (sched.running, sched.buffered) == (1, 1)


@pytest.mark.parametrize("offset", [3, 2])
def test_submit_rejects_offsets_that_do_not_increase(offset: int) -> None:
    """An offset not above the partition's last one is a caller bug and changes nothing."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=1, max_buffered=8)
    sched.submit("p", 3, "a", "x")
    with pytest.raises(ValueError, match="submitted after 3"):
        sched.submit("p", offset, "b", "y")
    assert (sched.buffered, sched.pending_offsets("p")) == (1, 3)


def test_completing_a_ticket_twice_raises() -> None:
    """A second complete of the same ticket is a caller bug."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=1, max_buffered=8)
    ticket = only(sched.submit("p", 0, "a", "x"))
    sched.complete(ticket)
    with pytest.raises(ValueError, match="not running"):
        sched.complete(ticket)


def test_completing_a_ticket_that_was_never_started_raises() -> None:
    """Only the ticket objects the scheduler handed out can be completed, not lookalikes."""
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=1, max_buffered=8)
    running = only(sched.submit("p", 0, "a", "x"))
    sched.submit("p", 1, "b", "y")
    with pytest.raises(ValueError, match="not issued"):
        sched.complete(Ticket("p", 0, "a", "x"))
    for copy in (Ticket("p", 1, "b", "y", running.epoch), Ticket("p", 0, "a", "x", running.epoch)):
        with pytest.raises(ValueError, match="not running"):
            sched.complete(copy)
    assert (sched.running, sched.buffered) == (1, 2)


def test_lowering_the_bound_lets_running_records_finish_and_starts_none_until_under_it() -> None:
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=3, max_buffered=10)
    running = [only(sched.submit("p", offset, f"k{offset}", "x")) for offset in range(3)]
    assert sched.submit("p", 3, "k3", "x") == []
    assert sched.set_max_in_flight(1) == []
    assert sched.complete(running[0]).start == []  # 2 still run, over the new bound of 1
    assert sched.complete(running[1]).start == []
    assert offsets(sched.complete(running[2]).start) == [3]


def test_raising_the_bound_starts_waiting_records_oldest_first() -> None:
    sched: KeyOrderedScheduler[str] = KeyOrderedScheduler(max_in_flight=1, max_buffered=10)
    sched.submit("p", 0, "a", "x")
    sched.submit("p", 1, "b", "x")
    sched.submit("q", 0, "c", "x")
    assert sched.set_max_in_flight(0) == []
    assert [(t.partition, t.offset) for t in sched.set_max_in_flight(3)] == [("p", 1), ("q", 0)]
    with pytest.raises(ValueError, match=">= 0"):
        sched.set_max_in_flight(-1)


@pytest.mark.parametrize(("max_in_flight", "max_buffered"), [(0, 1), (1, 0)])
def test_bounds_below_one_are_rejected(max_in_flight: int, max_buffered: int) -> None:
    """Both bounds must be at least one."""
    with pytest.raises(ValueError, match="must be >= 1"):
        KeyOrderedScheduler[str](max_in_flight=max_in_flight, max_buffered=max_buffered)


# The state machine: random submit / complete / revoke sequences against a simple model.

PARTITIONS = ("p0", "p1", "p2")
KEYS = ("a", "b", "c", None)


@dataclass
class Record:
    """The model's view of one submitted record."""

    seq: int
    partition: str
    offset: int
    key: str | None


class SchedulerMachine(RuleBasedStateMachine):
    """Drives the scheduler like the dispatcher does and checks it against a naive model."""

    def __init__(self) -> None:
        super().__init__()
        self._sched: KeyOrderedScheduler[int] | None = None
        self.max_in_flight = 0
        self.seq = 0
        self.next_offset = dict.fromkeys(PARTITIONS, 0)
        self.last_offset: dict[str, int | None] = dict.fromkeys(PARTITIONS)
        self.pending: dict[str, list[Record]] = {p: [] for p in PARTITIONS}  # taken, not acked
        self.finished: dict[str, set[int]] = {p: set() for p in PARTITIONS}
        self.waiting: dict[tuple[str, int], Record] = {}
        self.running: dict[tuple[str, int], Ticket[int]] = {}
        self.done: list[Ticket[int]] = []  # completed tickets of the current assignments
        self.stale: list[Ticket[int]] = []  # running tickets of revoked assignments
        self.submitted: dict[tuple[str, str | None], list[int]] = {}
        self.started: dict[tuple[str, str | None], list[int]] = {}
        self.slots_owed = False  # a revoke freed slots nobody has refilled yet
        self.taken_since_drain = 0  # drain and revoke reset state: let some build up first
        self.taken_since_revoke = 0

    @property
    def sched(self) -> KeyOrderedScheduler[int]:
        """The scheduler under test."""
        assert self._sched is not None
        return self._sched

    @initialize(max_in_flight=st.integers(1, 4), max_buffered=st.integers(1, 10))
    def create(self, max_in_flight: int, max_buffered: int) -> None:
        """Start with a fresh scheduler and random bounds."""
        self._sched = KeyOrderedScheduler(max_in_flight=max_in_flight, max_buffered=max_buffered)
        self.max_in_flight = max_in_flight

    # Model helpers

    def ready_records(self) -> list[Record]:
        """Waiting records that only lack a slot: no running predecessor of their key."""
        busy = {(t.partition, t.key) for t in self.running.values() if t.key is not None}
        heads: dict[tuple[str, str | None], Record] = {}
        ready = []
        for rec in sorted(self.waiting.values(), key=lambda r: r.offset):
            if rec.key is None:
                ready.append(rec)
            elif (rec.partition, rec.key) not in busy and (rec.partition, rec.key) not in heads:
                heads[(rec.partition, rec.key)] = rec
        return ready + list(heads.values())

    def on_started(self, tickets: list[Ticket[int]]) -> None:
        """Check and record tickets the scheduler says to start."""
        for ticket in tickets:
            assert isinstance(ticket.partition, str)
            rec = self.waiting.pop((ticket.partition, ticket.offset))
            assert (ticket.key, ticket.item) == (rec.key, rec.seq)
            ordering_key = (rec.partition, rec.key)
            if rec.key is not None:
                assert all((t.partition, t.key) != ordering_key for t in self.running.values()), (
                    "two running records of one key"
                )
            self.running[(rec.partition, rec.offset)] = ticket
            assert len(self.running) <= self.max_in_flight, "started over the bound"
            log = self.started.setdefault(ordering_key, [])
            log.append(rec.offset)
            assert log == self.submitted[ordering_key][: len(log)], "key start order != offsets"
        if tickets:
            newest = max(ticket.item for ticket in tickets)
            assert all(rec.seq > newest for rec in self.ready_records()), "not first come first"

    def on_acked(self, partition: Hashable, acks: list[tuple[Hashable, int]]) -> None:
        """Check acks: the partition's leading finished offsets, in order, and all of them."""
        assert isinstance(partition, str)
        pending, finished = self.pending[partition], self.finished[partition]
        for acked_partition, offset in acks:
            assert acked_partition == partition
            assert pending[0].offset == offset, "ack not the lowest taken offset"
            assert offset in finished, "acked an unfinished record"
            pending.pop(0)
            finished.remove(offset)
        assert not (pending and pending[0].offset in finished), "held back a finished record"

    # Rules

    @precondition(lambda self: self.sched.has_capacity)
    @rule(partition=st.sampled_from(PARTITIONS), key=st.sampled_from(KEYS), gap=st.integers(-2, 2))
    def submit(self, partition: str, key: str | None, gap: int) -> None:
        """Take the partition's next record; offsets may skip (compaction) or, a bug, go back."""
        last = self.last_offset[partition]
        if gap < 0 and last is not None:
            with pytest.raises(ValueError, match="submitted after"):
                self.sched.submit(partition, last + 1 + gap, key, -1)
            return
        offset = self.next_offset[partition] + max(gap, 0)
        self.next_offset[partition] = offset + 1
        self.last_offset[partition] = offset
        rec = Record(self.seq, partition, offset, key)
        self.seq += 1
        self.taken_since_drain += 1
        self.taken_since_revoke += 1
        self.pending[partition].append(rec)
        self.waiting[(partition, offset)] = rec
        self.submitted.setdefault((partition, key), []).append(offset)
        started = self.sched.submit(partition, offset, key, rec.seq)
        assert self.slots_owed or len(started) <= 1
        self.on_started(started)
        self.slots_owed = False

    def finish(self, ticket: Ticket[int]) -> None:
        """Complete ``ticket`` and check what that unlocks."""
        assert isinstance(ticket.partition, str)
        completion = self.sched.complete(ticket)
        del self.running[(ticket.partition, ticket.offset)]
        self.finished[ticket.partition].add(ticket.offset)
        self.done.append(ticket)
        self.on_started(completion.start)
        self.on_acked(ticket.partition, completion.ack)
        self.slots_owed = False

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 50))
    def complete(self, index: int) -> None:
        """Finish one running ticket, in any order."""
        self.finish(list(self.running.values())[index % len(self.running)])

    @precondition(lambda self: self.done or self.stale)
    @rule(index=st.integers(0, 50))
    def complete_spent(self, index: int) -> None:
        """A ticket completed before raises; one of a revoked assignment is ignored."""
        spent = self.done + self.stale
        ticket = spent[index % len(spent)]
        before = (self.sched.running, self.sched.buffered, self.sched.unacked)
        if index % len(spent) < len(self.done):
            with pytest.raises(ValueError, match="not running"):
                self.sched.complete(ticket)
        else:
            assert self.sched.complete(ticket) == Completion(start=[], ack=[])
        assert (self.sched.running, self.sched.buffered, self.sched.unacked) == before

    @rule(max_in_flight=st.integers(0, 4))
    def set_limit(self, max_in_flight: int) -> None:
        """The bound changes while records run (fleet share, 429s); lowered, running ones go on."""
        self.max_in_flight = max_in_flight
        started = self.sched.set_max_in_flight(max_in_flight)
        assert self.sched.max_in_flight == max_in_flight
        self.on_started(started)
        self.slots_owed = False

    @precondition(lambda self: self.taken_since_revoke >= 3)
    @rule(partitions=st.sets(st.sampled_from(PARTITIONS), min_size=1))
    def revoke(self, partitions: set[str]) -> None:
        """Lose partitions in a rebalance; they come back from their lowest unacked offset."""
        self.taken_since_revoke = 0
        expected = [t for key, t in self.running.items() if key[0] in partitions]
        cancelled = self.sched.revoke(partitions)
        assert sorted(map(id, cancelled)) == sorted(map(id, expected))
        self.stale.extend(cancelled)
        self.stale.extend(t for t in self.done if t.partition in partitions)
        self.done = [t for t in self.done if t.partition not in partitions]
        self.running = {k: t for k, t in self.running.items() if k[0] not in partitions}
        self.waiting = {k: r for k, r in self.waiting.items() if k[0] not in partitions}
        for partition in partitions:
            if self.pending[partition]:
                self.next_offset[partition] = self.pending[partition][0].offset  # redelivery
            self.last_offset[partition] = None
            self.pending[partition] = []
            self.finished[partition] = set()
            for log in (self.submitted, self.started):
                for key in KEYS:
                    log.pop((partition, key), None)
        # The next submit or complete refills the slots freed here.
        self.slots_owed = self.slots_owed or bool(cancelled)

    @precondition(
        lambda self: (
            self.taken_since_drain >= 8
            and self.max_in_flight > 0
            and (self.running or not self.slots_owed)
        )
    )
    @rule()
    def drain(self) -> None:
        """Finishing everything that runs eventually acks every record taken.

        From any state but one: a revoke freed slots and nothing runs. Then only the next submit
        starts the waiting records (the dispatcher revokes every partition it holds, so it never
        leaves records waiting).
        """
        self.taken_since_drain = 0
        while self.running:
            self.finish(next(iter(self.running.values())))
        assert all(not recs for recs in self.pending.values()), "taken records never acked"
        assert (self.sched.buffered, self.sched.unacked, self.sched.waiting) == (0, 0, 0)

    # Invariants

    @invariant()
    def consistent(self) -> None:
        """After every step the scheduler agrees with the model (checks below)."""
        self.check_counts()
        self.check_one_running_record_per_key()
        self.check_pending_offsets()
        self.check_no_slot_idles()

    def check_counts(self) -> None:
        """Running, waiting, buffered and unacked agree with the model, within the bounds."""
        sched = self.sched
        assert sched.running == len(self.running)
        assert sched.waiting == len(self.waiting)
        assert sched.buffered == len(self.running) + len(self.waiting)
        assert sched.unacked == sum(len(recs) for recs in self.pending.values())
        assert sched.has_capacity == (sched.buffered < sched.max_buffered)

    def check_one_running_record_per_key(self) -> None:
        """No two running tickets share a (partition, key)."""
        keyed = [(t.partition, t.key) for t in self.running.values() if t.key is not None]
        assert len(keyed) == len(set(keyed))

    def check_pending_offsets(self) -> None:
        """pending_offsets is each partition's lowest taken record not yet acked."""
        for partition, recs in self.pending.items():
            expected = recs[0].offset if recs else None
            assert self.sched.pending_offsets(partition) == expected
            assert expected is None or expected not in self.finished[partition]

    def check_no_slot_idles(self) -> None:
        """Unless a revoke just freed slots, a record that only lacks a slot means none is free."""
        if not self.slots_owed and self.ready_records():
            assert len(self.running) >= self.max_in_flight


# Shrinking a failing run can take minutes: more than the default timeout allows.
TestSchedulerMachine = pytest.mark.timeout(900)(SchedulerMachine.TestCase)
TestSchedulerMachine.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)
