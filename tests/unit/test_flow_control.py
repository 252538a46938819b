"""Unit tests of worker.kafka_adapters.SteadyFlowControl: what a resume does to queued records."""

from __future__ import annotations

import pytest
from mode.utils.queues import FlowControlQueue

from worker.kafka_adapters import FaustApp, SteadyFlowControl

pytestmark = pytest.mark.unit


def _running_flow_with_queue() -> tuple[SteadyFlowControl, FlowControlQueue[str]]:
    flow = SteadyFlowControl()
    flow.resume()  # flow control starts suspended
    queue: FlowControlQueue[str] = FlowControlQueue(flow_control=flow, clear_on_resume=True)
    queue.put_nowait("record")
    return flow, queue


async def test_resuming_a_flow_that_is_not_suspended_keeps_queued_records() -> None:
    """A resume while the flow runs (Faust's last step of recovery) leaves the queues alone."""
    flow, queue = _running_flow_with_queue()
    flow.resume()
    assert flow.is_active()
    assert queue.get_nowait() == "record"


async def test_resuming_a_suspended_flow_still_empties_the_queues() -> None:
    """After a suspension (a rebalance), resuming drops what was queued before it, as in Faust."""
    flow, queue = _running_flow_with_queue()
    flow.suspend()
    assert not flow.is_active()
    flow.resume()
    assert flow.is_active()
    assert queue.empty()


def test_the_worker_app_uses_the_steady_flow_control() -> None:
    """Every stream queue of the worker's Faust app is governed by SteadyFlowControl."""
    app = FaustApp("flow-control-unit-test", broker="kafka://127.0.0.1:9", store="memory://")
    assert isinstance(app.flow_control, SteadyFlowControl)
