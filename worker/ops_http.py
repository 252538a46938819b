"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on one port (aiohttp).

``/healthz`` answers 200 while the event loop runs (it answers at all) and the optional liveness
callable agrees. ``/readyz`` answers 200 when every check of the readiness callable is true, else
503; the body is JSON either way, e.g.
``{"ready": false, "checks": {"assigned": true, "recovered": false}, "failing": ["recovered"]}``.
A readiness callable that raises counts as not ready.

The optional dependencies callable reports what every pod shares (the broker, the Vapi key) under
``"dependencies"`` in both bodies and never changes a status: a shared failure would take every
pod out at once, which helps nothing and blocks node drains. One that raises reports ``{}``.
The optional info callable adds an ``"info"`` object to the readiness body: states worth seeing
that do not make the pod unready (a 429 backoff); one that raises shows ``{"error": <type>}``
there and changes nothing else. Access logs are off: probes would drown the worker's own lines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from worker.config import setting_default

Readiness = Callable[[], Mapping[str, bool]]
Info = Callable[[], Mapping[str, object]]
Liveness = Callable[[], bool]

_log = structlog.get_logger(__name__)

_NO_CACHE: Final = {"Cache-Control": "no-store"}


class OpsServer:
    """Serves the worker's metrics and health checks until ``stop()``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Readiness,
        host: str = "0.0.0.0",  # probes and scrapes come from outside the pod
        port: int = setting_default("worker_http_port"),
        *,
        liveness: Liveness | None = None,
        dependencies: Readiness | None = None,
        info: Info | None = None,
    ) -> None:
        self._registry = registry
        self._readiness = readiness
        self._liveness = liveness
        self._dependencies = dependencies
        self._info = info
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the real one when 0 was asked for), else the one asked."""
        if self._runner is not None:
            for address in self._runner.addresses:
                if isinstance(address, tuple):
                    return int(address[1])
        return self._port

    async def start(self) -> None:
        """Bind the port and serve; returns once the socket listens."""
        if self._runner is not None:
            raise RuntimeError("OpsServer already started")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        _log.info("ops server listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        """Close the port; a no-op when not started."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encoder(self._registry), headers=_NO_CACHE)
        # aiohttp refuses a charset inside content_type, so set the header whole.
        response.headers["Content-Type"] = content_type
        return response

    async def _healthz(self, _request: web.Request) -> web.Response:
        alive = self._liveness is None or _call_quietly(self._liveness)
        status = 200 if alive else 503
        body: dict[str, object] = {"alive": alive, **self._dependency_report()}
        return web.json_response(body, status=status, headers=_NO_CACHE)

    async def _readyz(self, _request: web.Request) -> web.Response:
        try:
            checks = {name: bool(ok) for name, ok in self._readiness().items()}
        except Exception as exc:
            _log.warning("readiness check raised", exc_info=exc)
            body = {"ready": False, "checks": {}, "failing": [], "error": type(exc).__name__}
            return web.json_response(self._with_info(body), status=503, headers=_NO_CACHE)
        failing = sorted(name for name, ok in checks.items() if not ok)
        ready = not failing
        body = {"ready": ready, "checks": checks, "failing": failing, **self._dependency_report()}
        status = 200 if ready else 503
        return web.json_response(self._with_info(body), status=status, headers=_NO_CACHE)

    def _with_info(self, body: dict[str, object]) -> dict[str, object]:
        if self._info is None:
            return body
        try:
            info = dict(self._info())
        except Exception as exc:
            _log.warning("readiness info raised", exc_info=exc)
            info = {"error": type(exc).__name__}
        return {**body, "info": info}

    def _dependency_report(self) -> dict[str, dict[str, bool]]:
        if self._dependencies is None:
            return {}
        try:
            shared = {name: bool(ok) for name, ok in self._dependencies().items()}
        except Exception as exc:
            _log.warning("dependency report raised", exc_info=exc)
            shared = {}
        return {"dependencies": shared}


def _call_quietly(check: Liveness) -> bool:
    try:
        return bool(check())
    except Exception as exc:
        _log.warning("liveness check raised", exc_info=exc)
        return False
