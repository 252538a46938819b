"""The client's wire: httpx-aiohttp's transport, set up for one API host, its errors mapped again.

Why aiohttp: the worker reads hundreds of SSE streams at once, and each event arrives as its own
network chunk, so what moving one chunk from the socket to the client costs is paid for every
delta. Through httpx's own stack (httpcore, h11, anyio) a chunk passes many Python-level async
frames; aiohttp parses HTTP with its C parser and hands the chunk over directly, for a fraction of
the CPU (the measurements are in ``bench/README.md``). ``httpx_aiohttp.AiohttpTransport`` puts
aiohttp under httpx's types (``httpx.Request`` and ``Response``), so ``VapiClient`` and its error
mapping and deadlines stay httpx, and tests can still hand the client an ``httpx.MockTransport``.

What this module adds to it:

- The session (``_session``): a pool of ``max_connections`` to the one host, no cookie jar (a
  load balancer's cookie must not pin the worker to one backend), no proxy or settings from the
  environment, bodies as sent (the client asks for ``identity``), and aiohttp's own TLS context
  (the system's CAs; the one httpx-aiohttp's constructor builds goes unused).
- The errors. httpx-aiohttp 0.2.0 maps every ``aiohttp.ClientConnectionError`` (a refused
  connection and a reset among them) to ``httpx.ConnectTimeout``, and lets an answer aiohttp
  cannot parse (an unreadable status line, absurd headers) out as aiohttp's own exception. Its
  mapped exception keeps aiohttp's as ``__cause__``; ``handle_async_request`` maps that again,
  the way httpx's own transport maps httpcore's:

    ===============================================  ===========================
    connecting took longer than the connect timeout  httpx.ConnectTimeout
    refused, unreachable, DNS failure                httpx.ConnectError
    no response (closed or reset), bad HTTP          httpx.RemoteProtocolError
    ===============================================  ===========================

  Past the headers, every failure of the body (cut short, reset) is an ``httpx.TransportError``
  whose ``__cause__`` is aiohttp's exception; ``VapiClient`` names that cause.

Timeouts come from the request, as httpx sets them (``request.extensions["timeout"]``): connect
(new connections), read (between chunks) and pool (waiting for a free connection). A body not read
to its end closes its connection instead of returning it to the pool (aiohttp's ``release``).
"""

from __future__ import annotations

import functools

import aiohttp
import httpx
import httpx_aiohttp

__all__ = ["VapiTransport"]


class VapiTransport(httpx_aiohttp.AiohttpTransport):
    """httpx-aiohttp's transport over the session below, created on first use.

    ``max_connections`` bounds the pool, like ``httpx.Limits(max_connections=...)`` does for
    httpx's transport.
    """

    def __init__(self, *, max_connections: int) -> None:
        self._open = functools.partial(_session, max_connections)
        super().__init__(limits=httpx.Limits(max_connections=max_connections), client=self._open)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.TransportError as exc:
            if exc.__cause__ is None:
                raise
            raise _mapped(exc.__cause__, request) from exc.__cause__
        except (aiohttp.ClientError, OSError) as exc:
            raise _mapped(exc, request) from exc

    async def aclose(self) -> None:
        await super().aclose()
        # A closed session cannot be used again: the next request opens a new one.
        self.client = self._open


def _session(max_connections: int) -> aiohttp.ClientSession:
    # Called on the first request, inside the running loop: aiohttp binds a session to it.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


def _mapped(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception for aiohttp's ``exc``, raised before a response had its headers."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc) or "connect timeout", request=request)
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout(str(exc) or "read timeout", request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc), request=request)
    message = str(exc) or "the server closed the connection without a response"
    return httpx.RemoteProtocolError(message, request=request)
