"""An httpx transport that moves the bytes with aiohttp: the same client, a cheaper wire.

Why: the worker reads hundreds of SSE streams at once, and each event arrives as its own network
chunk, so what moving one chunk from the socket to the client costs is paid for every delta.
Through httpx's own stack (httpcore, h11, anyio) a chunk passes many Python-level async frames;
aiohttp parses HTTP with its C parser and hands the chunk over directly, for a fraction of the
CPU (the measurements are in ``bench/README.md``). Everything above the wire stays httpx
(``httpx.Request`` and ``Response``, headers, status, ``VapiClient``'s error mapping and
deadlines), so the client's behaviour does not change, and tests can still hand the client an
``httpx.MockTransport``.

aiohttp's exceptions become httpx's here, at the boundary, as httpcore's do in httpx's transport:

    ===========================================  ===========================
    connecting took longer than the connect timeout  httpx.ConnectTimeout
    refused, unreachable, DNS failure            httpx.ConnectError
    no response (closed or reset), bad HTTP      httpx.RemoteProtocolError
    body cut short (truncated chunked body)      httpx.RemoteProtocolError
    reset or closed while reading the body       httpx.ReadError
    ===========================================  ===========================

Timeouts come from the request, as httpx sets them (``request.extensions["timeout"]``): connect
(new connections), read (between chunks) and pool (waiting for a free connection).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from yarl import URL

__all__ = ["AiohttpTransport"]

#: Request headers aiohttp writes itself from the connection and the body.
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests over one ``aiohttp.ClientSession``, created on first use.

    ``max_connections`` bounds the pool, like ``httpx.Limits(max_connections=...)`` does for
    httpx's transport (which this one replaces, together with its limits).
    """

    def __init__(self, *, max_connections: int = 512) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        # Created here, inside the running loop: aiohttp binds a session to the loop it starts on.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open_session()
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        headers = [
            (name, value)
            for name, value in request.headers.multi_items()
            if name.lower() not in _OWN_HEADERS
        ]
        try:
            response = await session.request(
                request.method,
                _yarl_url(str(request.url)),
                headers=headers,
                data=await request.aread(),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeouts.get("pool"),
                    sock_connect=timeouts.get("connect"),
                    sock_read=timeouts.get("read"),
                ),
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timeout", request=request) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "read timeout", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except (aiohttp.ClientError, OSError) as exc:
            message = str(exc) or "the server closed the connection without a response"
            raise httpx.RemoteProtocolError(message, request=request) from exc
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_ResponseStream(response, request),
            extensions=_extensions(response),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@functools.lru_cache(maxsize=64)
def _yarl_url(url: str) -> URL:
    # The worker calls one URL all day: parse it for aiohttp once, not per call.
    return URL(url, encoded=True)


def _extensions(response: aiohttp.ClientResponse) -> dict[str, Any]:
    version = response.version
    http_version = b"HTTP/1.1" if version is None else f"HTTP/{version[0]}.{version[1]}".encode()
    return {"http_version": http_version, "reason_phrase": (response.reason or "").encode()}


class _ResponseStream(httpx.AsyncByteStream):
    """The response body, chunk by chunk as it arrives; closing mid-body drops the connection."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except aiohttp.ClientPayloadError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=self._request) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "read timeout", request=self._request) from exc
        except (aiohttp.ClientError, OSError) as exc:
            message = str(exc) or "the connection broke off"
            raise httpx.ReadError(message, request=self._request) from exc

    async def aclose(self) -> None:
        # A body not read to its end leaves the connection in an unknown state: close it rather
        # than return it to the pool (``release`` does that only for a finished body).
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()
