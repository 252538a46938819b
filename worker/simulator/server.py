"""The simulator as an aiohttp application, and a context manager that serves it on a port.

Why aiohttp: every stream is a coroutine writing to a ``StreamResponse``, so hundreds of slow
streams cost hundreds of small tasks, not threads, and a zero-delay mode can be flooded for
throughput benchmarks. The server cancels a handler when its client goes away, so
``streams_in_flight`` drops as soon as the worker gives up on a stream.

    async with serve_simulator(SimulatorConfig(inter_token_delay_s=0)) as sim:
        client = httpx.AsyncClient(base_url=sim.base_url)
        ...
        assert sim.state.stats.peak_streams_in_flight == 100
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from worker.simulator.chat import ChatHandler
from worker.simulator.config import SimulatorConfig
from worker.simulator.faults import FaultBook, FaultRule
from worker.simulator.inspection import Inspection
from worker.simulator.state import SimulatorState

__all__ = [
    "CONFIG_KEY",
    "STATE_KEY",
    "RunningSimulator",
    "SimulatorConfig",
    "SimulatorState",
    "create_app",
    "serve_simulator",
]

CONFIG_KEY = web.AppKey("simulator_config", SimulatorConfig)
STATE_KEY = web.AppKey("simulator_state", SimulatorState)
#: How long shutdown waits for open streams before cancelling them.
SHUTDOWN_GRACE_S = 1.0
#: Listen backlog: a benchmark opens hundreds of connections at once.
LISTEN_BACKLOG = 2048


def create_app(config: SimulatorConfig) -> web.Application:
    """An application with its own fresh state; ``app[STATE_KEY]`` reaches it."""
    state = SimulatorState(FaultBook(config.faults))
    app = web.Application()
    app[CONFIG_KEY] = config
    app[STATE_KEY] = state
    chats = ChatHandler(config, state)
    app.router.add_post("/chat", chats.handle)
    app.router.add_get("/chat/{id}", chats.get_chat)
    app.add_routes(Inspection(state).routes())
    return app


@dataclass
class RunningSimulator:
    """A simulator serving on ``base_url``; ``state`` is live (calls, chats, stats, faults)."""

    base_url: str
    state: SimulatorState
    config: SimulatorConfig
    app: web.Application

    @property
    def port(self) -> int:
        """The port actually bound (useful after asking for port 0)."""
        return int(self.base_url.rsplit(":", 1)[1])

    def add_fault(self, rule: FaultRule) -> None:
        """Add a server-wide fault rule, as ``POST /_sim/faults`` does."""
        self.state.faults.add(rule)

    def clear_faults(self) -> None:
        """Remove all server-wide rules and their ``times`` counts."""
        self.state.faults.clear()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@asynccontextmanager
async def serve_simulator(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSimulator]:
    """Serve a fresh simulator on ``host:port`` (0 picks a free port) until the block exits."""
    app = create_app(config)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
        await site.start()
        bound_port = runner.addresses[0][1]
        yield RunningSimulator(
            base_url=f"http://{_url_host(host)}:{bound_port}",
            state=app[STATE_KEY],
            config=config,
            app=app,
        )
    finally:
        await runner.cleanup()
