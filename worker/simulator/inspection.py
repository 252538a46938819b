"""The simulator's own endpoints (no auth): what tests and benchmarks read back and steer.

Why: a test that drives the worker through Kafka still needs to see what reached "Vapi" (which
attempt, which ``previousChatId``, how many streams at once) and to switch faults on and off
without restarting anything. Everything lives under ``/_sim/`` so it cannot be mistaken for Vapi.

    GET    /healthz                200 while serving
    GET    /_sim/calls             every /chat call, oldest first      DELETE clears them
    GET    /_sim/stats             calls, streams_in_flight, peak_streams_in_flight, over_limit
    POST   /_sim/stats/reset       zero the call count; the peak restarts from streams open now
    GET    /_sim/delta-times       {chat_id: [time.time() before each delta write]}  DELETE clears
    GET    /_sim/faults            server-wide fault rules             DELETE removes all
    POST   /_sim/faults            add rules: one object or a list; each ``{"rule": "<--fault
                                   syntax>"}`` or ``{"kind", "params", "match_assistant_id",
                                   "match_input_contains", "times"}``
"""

from __future__ import annotations

from dataclasses import asdict

from aiohttp import web

from worker.simulator.errors import SpecError
from worker.simulator.faults import FaultRule
from worker.simulator.state import SimulatorState


class Inspection:
    """Handlers for ``/_sim/*`` and ``/healthz`` over one state."""

    def __init__(self, state: SimulatorState) -> None:
        self._state = state

    def routes(self) -> list[web.RouteDef]:
        """The route table, for ``app.add_routes``."""
        return [
            web.get("/healthz", self.healthz),
            web.get("/_sim/calls", self.get_calls),
            web.delete("/_sim/calls", self.clear_calls),
            web.get("/_sim/stats", self.get_stats),
            web.post("/_sim/stats/reset", self.reset_stats),
            web.get("/_sim/delta-times", self.get_delta_times),
            web.delete("/_sim/delta-times", self.clear_delta_times),
            web.get("/_sim/faults", self.get_faults),
            web.post("/_sim/faults", self.add_faults),
            web.delete("/_sim/faults", self.clear_faults),
        ]

    async def healthz(self, request: web.Request) -> web.Response:
        """Alive."""
        return web.json_response({"status": "ok"})

    async def get_calls(self, request: web.Request) -> web.Response:
        """Every recorded call."""
        return web.json_response([call.to_json() for call in self._state.calls])

    async def clear_calls(self, request: web.Request) -> web.Response:
        """Forget the recorded calls (chats and sessions stay)."""
        cleared = len(self._state.calls)
        self._state.calls.clear()
        return web.json_response({"cleared": cleared})

    async def get_stats(self, request: web.Request) -> web.Response:
        """The counters."""
        return web.json_response(asdict(self._state.stats))

    async def reset_stats(self, request: web.Request) -> web.Response:
        """Start a new measurement window."""
        self._state.stats.reset()
        return web.json_response(asdict(self._state.stats))

    async def get_delta_times(self, request: web.Request) -> web.Response:
        """Delta write times per chat (empty unless ``record_delta_times``)."""
        return web.json_response(self._state.delta_times)

    async def clear_delta_times(self, request: web.Request) -> web.Response:
        """Forget the recorded delta times."""
        self._state.delta_times.clear()
        return web.json_response({"cleared": True})

    async def get_faults(self, request: web.Request) -> web.Response:
        """The server-wide fault rules."""
        return web.json_response([rule.to_json() for rule in self._state.faults.rules])

    async def add_faults(self, request: web.Request) -> web.Response:
        """Add rules; all or none (a bad rule answers 400 and adds nothing)."""
        try:
            body = await request.json()
            items = body if isinstance(body, list) else [body]
            rules = [FaultRule.from_json(item) for item in items]
        except (ValueError, SpecError) as exc:
            return web.json_response({"message": str(exc), "statusCode": 400}, status=400)
        for rule in rules:
            self._state.faults.add(rule)
        return web.json_response([rule.to_json() for rule in self._state.faults.rules])

    async def clear_faults(self, request: web.Request) -> web.Response:
        """Remove every rule and reset the ``times`` counts."""
        self._state.faults.clear()
        return web.json_response([])
