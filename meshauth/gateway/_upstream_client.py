"""The gateway's HTTP/1.1 client to its upstreams: h11 over asyncio streams, a LIFO pool per origin.

httpx's default transport (httpcore) checks every pooled connection on every
request (``AsyncConnectionPool._assign_requests_to_connections``: expiry,
``is_socket_readable``, the current task), so each request costs O(pool size);
under 50 concurrent clients that was over half of the gateway's CPU. Here a
request takes the most recently used idle connection of its origin, checks
that one (not closed by the upstream, not idle too long) and gives it back when
the response has been read to its end: O(1) per request.

It is an ``httpx.AsyncBaseTransport``: requests and responses are httpx's, and
failures are httpx's exceptions (``ConnectError``, ``ConnectTimeout``,
``ReadTimeout``, ``WriteError``, ``RemoteProtocolError``), so the proxy's
mapping to ``502``/``504`` is the same as with any transport. No retries: a
request is sent once; only a kept-alive connection found closed before the
request was written is replaced by a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import h11
import httpx

__all__ = ["UpstreamTransport"]

_READ: Final = 65536
_DEFAULT_TIMEOUT: Final = {"connect": 5.0, "read": 30.0, "write": 30.0}


class _Connection:
    """One kept-alive connection to an origin."""

    __slots__ = ("http", "idle_since", "reader", "received", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=_READ)
        self.idle_since = 0.0
        self.received = 0  # bytes read in the current exchange

    def usable(self, now: float, expiry: float) -> bool:
        """Still open at the upstream's end, and not idle past ``expiry``."""
        return now - self.idle_since < expiry and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


Origin = tuple[str, str, int]


class UpstreamTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to upstream services, with at most ``max_idle`` kept-alive connections per origin."""

    def __init__(self, *, max_idle: int = 128, keepalive_expiry: float = 30.0) -> None:
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self._idle: dict[Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        timeout = {**_DEFAULT_TIMEOUT, **request.extensions.get("timeout", {})}
        connection = self._take(origin)
        # A kept-alive connection the upstream closed just now fails before any response byte;
        # a request without a body is then sent once more, on a new connection.
        retry = connection is not None and not _has_body(request)
        if connection is None:
            connection = await self._connect(origin, timeout["connect"])
        try:
            try:
                await self._send_request(connection, request, timeout["write"])
                response = await self._receive_head(connection, timeout["read"])
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if not retry or connection.received:
                    raise
                connection.close()
                connection = await self._connect(origin, timeout["connect"])
                await self._send_request(connection, request, timeout["write"])
                response = await self._receive_head(connection, timeout["read"])
        except BaseException:
            connection.close()
            raise
        body = _Body(self, origin, connection, timeout["read"])
        return httpx.Response(
            response.status_code,
            headers=list(response.headers),
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason},
        )

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now, self.keepalive_expiry):
                return connection
            connection.close()
        return None

    def give_back(self, origin: Origin, connection: _Connection) -> None:
        """Keep a connection whose exchange ended cleanly; close any other."""
        http = connection.http
        idle = self._idle.setdefault(origin, [])
        clean = http.our_state is h11.DONE and http.their_state is h11.DONE
        if self._closed or not clean or len(idle) >= self.max_idle:
            connection.close()
            return
        http.start_next_cycle()
        connection.received = 0
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def _connect(self, origin: Origin, limit: float) -> _Connection:
        scheme, host, port = origin
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            async with asyncio.timeout(limit):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None, limit=_READ
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} took over {limit:g} s") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or type(exc).__name__}") from None
        return _Connection(reader, writer)

    async def _send_request(self, connection: _Connection, request: httpx.Request, limit: float) -> None:
        http = connection.http
        target = request.url.raw_path
        head = h11.Request(method=request.method, target=target, headers=request.headers.raw)
        await _write(connection, http.send(head), limit)
        stream: Any = request.stream
        if _has_body(request):
            async for chunk in stream:
                if chunk:
                    await _write(connection, http.send(h11.Data(data=chunk)), limit)
        await _write(connection, http.send(h11.EndOfMessage()), limit)

    async def _receive_head(self, connection: _Connection, limit: float) -> h11.Response:
        while True:
            event = await _next_event(connection, limit)
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise httpx.RemoteProtocolError("the upstream closed the connection without a response")

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def _has_body(request: httpx.Request) -> bool:
    return "content-length" in request.headers or "transfer-encoding" in request.headers


async def _write(connection: _Connection, data: bytes | None, limit: float) -> None:
    if not data:
        return
    connection.writer.write(data)
    try:
        async with asyncio.timeout(limit):
            await connection.writer.drain()
    except TimeoutError:
        raise httpx.WriteTimeout(f"the upstream did not take the request within {limit:g} s") from None
    except OSError as exc:
        raise httpx.WriteError(f"writing to the upstream failed: {type(exc).__name__}") from None


async def _next_event(connection: _Connection, limit: float) -> Any:
    http = connection.http
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(f"the upstream broke HTTP/1.1: {str(exc)[:120]}") from None
        if event is not h11.NEED_DATA:
            return event
        try:
            async with asyncio.timeout(limit):
                data = await connection.reader.read(_READ)
        except TimeoutError:
            raise httpx.ReadTimeout(f"the upstream sent nothing for {limit:g} s") from None
        except OSError as exc:
            raise httpx.ReadError(f"reading from the upstream failed: {type(exc).__name__}") from None
        connection.received += len(data)
        http.receive_data(data)


class _Body(httpx.AsyncByteStream):
    """The response body, read as the proxy relays it; the connection goes back to the pool at its end."""

    def __init__(self, transport: UpstreamTransport, origin: Origin, connection: _Connection, timeout: float):
        self.transport = transport
        self.origin = origin
        self.connection: _Connection | None = connection
        self.timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self.connection
        if connection is None:
            return
        while True:
            event = await _next_event(connection, self.timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.connection = None
                self.transport.give_back(self.origin, connection)
                return
            else:
                raise httpx.RemoteProtocolError("the upstream closed the connection inside the response body")

    async def aclose(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:  # not read to its end: the connection cannot carry another request
            connection.close()
