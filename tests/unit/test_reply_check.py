"""Unit tests for the reply check: the fetched chat's cost and completeness, retries, metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from worker.errors import VapiStatusError, VapiTimeoutError
from worker.metrics import WorkerMetrics
from worker.reply_check import UNCHECKED, ReplyCheck, ReplyChecker, check_against
from worker.vapi.chat import ReplyCost

pytestmark = pytest.mark.unit

CHAT = {
    "id": "chat_1",
    "output": [{"role": "assistant", "content": "Hello there"}],
    "cost": 0.002,
    "costs": [{"type": "model", "promptTokens": 40, "completionTokens": 2, "cost": 0.002}],
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Fetcher:
    """Answers with ``answers`` in turn: an exception is raised, anything else returned."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, float]] = []

    async def fetch_chat(self, chat_id: str, *, request_id: str, timeout_s: float) -> object:
        self.calls.append((chat_id, timeout_s))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _checker(fetcher: Fetcher, clock: Clock, metrics: WorkerMetrics) -> ReplyChecker:
    return ReplyChecker(
        fetcher, metrics, fetch_timeout_s=30, clock=clock, sleep=clock.sleep, delays_s=(1, 2)
    )


@pytest.fixture
def metrics() -> WorkerMetrics:
    return WorkerMetrics(CollectorRegistry())


def _sample(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_whole_stream_is_complete_and_keeps_its_text() -> None:
    assert check_against("Hello there", CHAT) == ReplyCheck(
        cost=ReplyCost(0.002, 40, 2), stream_complete=True, vapi_text=None
    )


def test_a_short_stream_is_incomplete_and_gets_vapis_text() -> None:
    check = check_against("Hello", CHAT)
    assert check.stream_complete is False
    assert check.vapi_text == "Hello there"


def test_a_chat_without_output_leaves_completeness_unknown() -> None:
    assert check_against("Hello", {"cost": 0.1}) == ReplyCheck(ReplyCost(0.1, 0, 0), None, None)


async def test_check_counts_spend_tokens_and_the_result(metrics: WorkerMetrics) -> None:
    clock = Clock()
    checker = _checker(Fetcher(CHAT, CHAT), clock, metrics)
    await checker.check("chat_1", "Hello", request_id="r", deadline=200)
    await checker.check("chat_1", "Hello there", request_id="r", deadline=200)
    assert _sample(metrics, "chat_worker_cost_usd_total") == pytest.approx(0.004)
    assert _sample(metrics, "chat_worker_tokens_total", kind="prompt") == 80
    assert _sample(metrics, "chat_worker_tokens_total", kind="completion") == 4
    assert _sample(metrics, "chat_worker_reply_checks_total", result="incomplete") == 1
    assert _sample(metrics, "chat_worker_reply_checks_total", result="complete") == 1


async def test_a_failed_fetch_is_tried_again(metrics: WorkerMetrics) -> None:
    clock = Clock()
    fetcher = Fetcher(VapiStatusError("503", http_status=503), CHAT)
    check = await _checker(fetcher, clock, metrics).check(
        "chat_1", "Hello there", request_id="r", deadline=200
    )
    assert check.stream_complete is True
    assert clock.slept == [1]
    assert len(fetcher.calls) == 2


async def test_fetches_that_keep_failing_leave_the_reply_unchecked(metrics: WorkerMetrics) -> None:
    """Every try fails: no cost, no verdict, counted as unchecked; never an exception."""
    clock = Clock()
    fetcher = Fetcher(*(VapiTimeoutError("slow", phase="fetch") for _ in range(3)))
    check = await _checker(fetcher, clock, metrics).check(
        "chat_1", "Hello", request_id="r", deadline=200
    )
    assert check == UNCHECKED
    assert len(fetcher.calls) == 3
    assert clock.slept == [1, 2]
    assert _sample(metrics, "chat_worker_reply_checks_total", result="unchecked") == 1
    assert _sample(metrics, "chat_worker_cost_usd_total") == 0


async def test_tries_stay_within_the_deadline(metrics: WorkerMetrics) -> None:
    """A try gets at most what is left of the deadline; no pause runs past it; none after it."""
    clock = Clock()
    fetcher = Fetcher(VapiStatusError("500", http_status=500), CHAT)
    check = await _checker(fetcher, clock, metrics).check(
        "chat_1", "Hello", request_id="r", deadline=100.5
    )
    assert check == UNCHECKED
    assert fetcher.calls == [("chat_1", 0.5)]
    assert clock.slept == []
    assert (
        await _checker(Fetcher(), clock, metrics).check(
            "chat_1", "x", request_id="r", deadline=clock.now
        )
        == UNCHECKED
    )
