"""Unit tests for fault rules, their text syntax and the ``times=K`` bookkeeping."""

from __future__ import annotations

import pytest

from worker.simulator.errors import SpecError
from worker.simulator.faults import (
    DisconnectFault,
    FaultBook,
    FaultRule,
    FetchFault,
    MalformedFault,
    RawStatusFault,
    ResetFault,
    StallFault,
    StatusFault,
    TruncateFault,
    parse_fault_rule,
    parse_fault_spec,
    plan_faults,
)

pytestmark = pytest.mark.unit


def test_every_kind_parses_with_its_defaults() -> None:
    """Each fault kind has usable defaults, so ``KIND`` alone is a valid spec."""
    assert parse_fault_spec("status").fault == StatusFault(code=500)
    assert parse_fault_spec("rawstatus").fault == RawStatusFault(code=999)
    assert parse_fault_spec("reset").fault == ResetFault()
    assert parse_fault_spec("stall").fault == StallFault(after=1, seconds=5.0)
    assert parse_fault_spec("disconnect").fault == DisconnectFault(after=1)
    assert parse_fault_spec("malformed").fault == MalformedFault(after=1, line="json")
    assert parse_fault_spec("truncate").fault == TruncateFault(after=1)
    assert parse_fault_spec("fetch").fault == FetchFault(code=500, gets=None)


def test_fetch_faults_are_planned_apart_from_the_stream() -> None:
    """``fetch`` disturbs the chat's GETs only; ``truncate`` is a stream fault."""
    plan = plan_faults([TruncateFault(after=2), FetchFault(code=503, gets=1)])
    assert plan.in_stream == (TruncateFault(after=2),)
    assert plan.on_fetch == (FetchFault(code=503, gets=1),)
    assert plan.kinds == "truncate,fetch"
    with pytest.raises(SpecError, match="gets"):
        parse_fault_spec("fetch gets=-1")
    with pytest.raises(SpecError, match="code"):
        parse_fault_spec("fetch code=200")


def test_parameters_are_typed() -> None:
    """Text parameters become numbers of the right type."""
    assert parse_fault_spec("stall after=3 seconds=0.5").fault == StallFault(after=3, seconds=0.5)
    assert parse_fault_spec("status code=429 retry_after_in=2").fault == StatusFault(
        code=429, retry_after_in_s=2.0
    )


def test_rawstatus_takes_any_code_http_has_no_meaning_for() -> None:
    """``rawstatus`` answers what a broken proxy might: any code from 0 to 999, up front."""
    assert parse_fault_spec("rawstatus code=0").fault == RawStatusFault(code=0)
    assert parse_fault_spec("rawstatus code=600").fault == RawStatusFault(code=600)
    for bad in ("rawstatus code=1000", "rawstatus code=-1", "rawstatus code=2.5"):
        with pytest.raises(SpecError):
            parse_fault_spec(bad)
    plan = plan_faults([StallFault(), RawStatusFault(code=999)])
    assert (plan.before_response, plan.kinds) == (RawStatusFault(code=999), "rawstatus")


def test_rule_syntax_with_matchers() -> None:
    """``assistant=ID,input=TEXT:SPEC`` sets both matchers and the fault."""
    rule = parse_fault_rule("assistant=sim-429,input=boom:status code=429 retry_after=1 times=2")
    assert rule.match_assistant_id == "sim-429"
    assert rule.match_input_contains == "boom"
    assert rule.times == 2
    assert rule.fault == StatusFault(code=429, retry_after="1")


def test_rule_syntax_without_matchers_keeps_colons_in_values() -> None:
    """A spec whose values contain colons is not mistaken for matchers."""
    rule = parse_fault_rule('status code=503 retry_after="Wed, 21 Oct 2015 07:28:00 GMT"')
    assert rule.match_assistant_id is None
    assert rule.fault == StatusFault(code=503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")


def test_rule_matching() -> None:
    """A rule applies only to its assistant and to inputs containing its text."""
    rule = parse_fault_rule("assistant=a1,input=boom:reset")
    assert rule.matches("a1", "big boom")
    assert not rule.matches("a2", "big boom")
    assert not rule.matches("a1", "quiet")


def test_json_round_trip() -> None:
    """``to_json`` output is accepted back by ``from_json``; numbers become text."""
    rule = FaultRule.from_json({"kind": "stall", "params": {"after": 2, "seconds": 1}, "times": 1})
    assert rule.params == {"after": "2", "seconds": "1"}
    assert FaultRule.from_json(rule.to_json()) == rule
    assert FaultRule.from_json({"rule": "assistant=x:reset"}).match_assistant_id == "x"


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"params": {}},
        {"kind": "reset", "extra": 1},
        {"kind": "reset", "params": []},
        {"kind": "reset", "times": -1},
        {"kind": "stall", "params": {"after": "soon"}},
    ],
)
def test_bad_json_rules_are_rejected(data: object) -> None:
    """Malformed JSON rules raise ``SpecError``."""
    with pytest.raises(SpecError):
        FaultRule.from_json(data)


def test_times_counts_per_request_key() -> None:
    """``times=2`` arms the fault for the first two calls of each key, then never again."""
    book = FaultBook()
    rule = parse_fault_spec("status code=500 times=2")

    def fired(key: str) -> bool:
        plan = book.arm([rule], call_key=key, assistant_id=None, input_text="")
        return plan.before_response is not None

    assert [fired("r1"), fired("r1"), fired("r2"), fired("r1"), fired("r2"), fired("r2")] == [
        True,
        True,
        True,
        False,
        True,
        False,
    ]


def test_server_rules_apply_after_directives_and_can_be_cleared() -> None:
    """Matching server rules join the call's own faults; ``clear`` removes them and their counts."""
    book = FaultBook([parse_fault_rule("assistant=a1:stall after=0 seconds=1")])
    directive = parse_fault_spec("malformed after=2")
    plan = book.arm([directive], call_key="k", assistant_id="a1", input_text="")
    assert plan.in_stream == (MalformedFault(after=2), StallFault(after=0, seconds=1.0))
    assert plan.kinds == "malformed,stall"
    book.clear()
    assert book.arm([], call_key="k", assistant_id="a1", input_text="").kinds is None


def test_an_up_front_fault_wins() -> None:
    """A status or reset fault replaces the whole response, so stream faults are dropped."""
    plan = plan_faults([StallFault(), StatusFault(code=429), ResetFault()])
    assert plan.before_response == StatusFault(code=429)
    assert plan.in_stream == ()
    assert plan.kinds == "status"
