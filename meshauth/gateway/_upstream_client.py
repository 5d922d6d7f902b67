"""The gateway's HTTP/1.1 client to its upstreams: asyncio streams, a LIFO pool per origin.

httpx's default transport (httpcore) checks every pooled connection on every
request (``AsyncConnectionPool._assign_requests_to_connections``: expiry,
``is_socket_readable``, the current task), so each request costs O(pool size);
under 50 concurrent clients that was over half of the gateway's CPU. Here a
request takes the most recently used idle connection of its origin, checks
that one (not closed by the upstream, not idle too long) and gives it back when
the response has been read to its end: O(1) per request.

The gateway calls :meth:`UpstreamTransport.exchange` with the request's parts
(no ``httpx.Request`` or ``httpx.Response`` is built per request); heads and
bodies go through ``_http11``, the same grammar the server applies to
clients. The transport is also an ``httpx.AsyncBaseTransport``. Failures are
httpx's exceptions (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``,
``WriteError``, ``RemoteProtocolError``) on both paths, so the proxy's
mapping to ``502``/``504`` is the same as with any transport. No retries: a
request is sent once; only a kept-alive connection found closed before the
request was written is replaced by a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Final

import httpx

from ._http11 import BodyReader, BodyWriter, Head, LocalProtocolError, ProtocolError, encode_request, head_end
from ._http11 import parse_response as _parse_response

__all__ = ["Origin", "UpstreamCertificateRejected", "UpstreamResponse", "UpstreamTransport"]

_READ: Final = 65536
_DEFAULT_TIMEOUT: Final = {"connect": 5.0, "read": 30.0, "write": 30.0}

Origin = tuple[str, str, int]


class UpstreamCertificateRejected(httpx.ConnectError):
    """The upstream's TLS certificate did not verify (an unknown CA, a wrong name, expired)."""


class _Connection:
    """One kept-alive connection to an origin."""

    __slots__ = ("expired", "idle_since", "reader", "received", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.received = 0  # bytes read in the current exchange
        self.expired = False

    def expire(self) -> None:
        """A read deadline passed: cut the connection, which ends the read with nothing."""
        self.expired = True
        self.writer.transport.abort()

    def usable(self, now: float, expiry: float) -> bool:
        """Still open at the upstream's end, and not idle past ``expiry``."""
        return now - self.idle_since < expiry and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


class UpstreamResponse:
    """An upstream's answer: status, headers (lower-case names) and the body, read as it is relayed.

    ``length`` is the declared ``Content-Length`` (-1 without one);
    ``complete`` turns true as soon as the last piece of the body is known to
    be the last (before it is handed out, when the end is already in hand), so
    the relay can send it as the final message.
    """

    __slots__ = ("complete", "headers", "length", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], length: int) -> None:
        self.status = status
        self.headers = headers
        self.length = length
        self.complete = False

    def chunks(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release the response (a body not read to its end closes its connection)."""


class UpstreamTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to upstream services, with at most ``max_idle`` kept-alive connections per origin."""

    def __init__(self, *, max_idle: int = 128, keepalive_expiry: float = 30.0) -> None:
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self._idle: dict[Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def exchange(
        self,
        method: bytes,
        origin: Origin,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        body: AsyncIterable[bytes] | None,
        timeouts: Mapping[str, float],
    ) -> UpstreamResponse:
        """Send one request (``headers`` include ``Host``; ``body`` only if it has one) and read the head.

        A ``Content-Length`` among the headers sizes the body; a body without
        one goes chunked.
        """
        limits = {**_DEFAULT_TIMEOUT, **timeouts}
        try:
            head, writer = encode_request(method, target, headers, chunked=body is not None)
        except LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from None
        connection = self._take(origin)
        # A kept-alive connection the upstream closed just now fails before any response byte;
        # a request without a body is then sent once more, on a new connection.
        retry = connection is not None and body is None
        if connection is None:
            connection = await self._connect(origin, limits["connect"])
        try:
            try:
                await self._send(connection, head, writer, body, limits["write"])
                response, rest = await _receive_head(connection, limits["read"])
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if not retry or connection.received:
                    raise
                connection.close()
                connection = await self._connect(origin, limits["connect"])
                await self._send(connection, head, writer, body, limits["write"])
                response, rest = await _receive_head(connection, limits["read"])
        except BaseException:
            connection.close()
            raise
        reader = BodyReader.for_response(response, method)
        if rest:
            reader.feed(rest)
        length = response.content_length if response.content_length is not None and not response.chunked else -1
        return _Body(self, origin, connection, response, reader, length, limits["read"])

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        stream = request.stream if has_body else None
        response = await self.exchange(
            request.method.encode("ascii"),
            origin,
            url.raw_path,
            list(request.headers.raw),
            body=stream if isinstance(stream, AsyncIterable) else None,
            timeouts=request.extensions.get("timeout", {}),
        )
        return httpx.Response(
            response.status,
            headers=response.headers,
            stream=_HttpxStream(response),
            extensions={"http_version": b"HTTP/1.1"},
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
        """Keep a connection whose exchange ended cleanly (the caller checked); close it when full."""
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= self.max_idle:
            connection.close()
            return
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
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamCertificateRejected(
                f"the TLS certificate of {host}:{port} did not verify: {exc.verify_message}"
            ) from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or type(exc).__name__}") from None
        return _Connection(reader, writer)

    async def _send(
        self,
        connection: _Connection,
        head: bytes,
        writer: BodyWriter,
        body: AsyncIterable[bytes] | None,
        limit: float,
    ) -> None:
        try:
            if body is None:
                await _write(connection, head + writer.end(), limit)
                return
            await _write(connection, head, limit)
            async for chunk in body:
                if chunk:
                    await _write(connection, writer.data(chunk), limit)
            await _write(connection, writer.end(), limit)
        except LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from None

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


async def _write(connection: _Connection, data: bytes, limit: float) -> None:
    if not data:
        return
    writer = connection.writer
    if writer.is_closing():
        raise httpx.WriteError("the upstream connection is closed")
    writer.write(data)
    if not writer.transport.get_write_buffer_size():
        return  # the kernel took it all
    try:
        async with asyncio.timeout(limit):
            await writer.drain()
    except TimeoutError:
        raise httpx.WriteTimeout(f"the upstream did not take the request within {limit:g} s") from None
    except OSError as exc:
        raise httpx.WriteError(f"writing to the upstream failed: {type(exc).__name__}") from None


async def _read(connection: _Connection, limit: float) -> bytes:
    # Past the deadline the connection is cut (it cannot carry another request anyway), which
    # ends the read: a timer and its cancellation cost less than an asyncio.timeout scope.
    loop = asyncio.get_running_loop()
    timer = loop.call_at(loop.time() + limit, connection.expire)
    try:
        data = await connection.reader.read(_READ)
    except OSError as exc:
        raise httpx.ReadError(f"reading from the upstream failed: {type(exc).__name__}") from None
    finally:
        timer.cancel()
    if connection.expired:
        raise httpx.ReadTimeout(f"the upstream sent nothing for {limit:g} s")
    connection.received += len(data)
    return data


async def _receive_head(connection: _Connection, limit: float) -> tuple[Head, bytes]:
    """The final response head (1xx heads are skipped) and the bytes read past it."""
    buffer = b""
    scanned = 0
    while True:
        end, rest = head_end(buffer, scanned)
        if end >= 0:
            try:
                head = _parse_response(buffer[:end])
            except ProtocolError as exc:
                raise httpx.RemoteProtocolError(f"the upstream broke HTTP/1.1: {exc.detail[:120]}") from None
            buffer, scanned = buffer[rest:], 0
            if head.status >= 200:
                return head, buffer
            continue
        if len(buffer) > _READ:
            raise httpx.RemoteProtocolError("the upstream's response head is too large")
        scanned = max(0, len(buffer) - 3)
        data = await _read(connection, limit)
        if not data:
            raise httpx.RemoteProtocolError("the upstream closed the connection without a response")
        buffer += data


class _Body(UpstreamResponse):
    """A response of the pool: the connection goes back to it when the body has been read to its end."""

    __slots__ = ("_connection", "_keep_alive", "_origin", "_reader", "_ready", "_timeout", "_transport")

    def __init__(  # noqa: PLR0917 - the parts of one exchange
        self,
        transport: UpstreamTransport,
        origin: Origin,
        connection: _Connection,
        head: Head,
        reader: BodyReader,
        length: int,
        timeout: float,
    ) -> None:
        super().__init__(head.status, head.headers, length)
        self._transport = transport
        self._origin = origin
        self._connection: _Connection | None = connection
        self._keep_alive = head.keep_alive
        self._reader = reader
        self._timeout = timeout
        # What came with the head is decoded now: a body that is already whole (most small
        # answers) is complete before the relay starts, and the connection is back in the pool.
        ready: list[bytes] = []
        try:
            while (piece := reader.next()) is not None:
                ready.append(piece)
        except ProtocolError:
            pass  # raised again by chunks(), where the relay expects it
        # One piece: with ``complete`` set, it is the last one.
        self._ready = [b"".join(ready)] if len(ready) > 1 else ready
        if reader.done:
            self._finish()

    async def chunks(self) -> AsyncIterator[bytes]:
        ready, self._ready = self._ready, []
        for piece in ready:
            yield piece
        reader = self._reader
        while self._connection is not None:
            try:
                data = reader.next()
            except ProtocolError as exc:
                raise httpx.RemoteProtocolError(f"the upstream broke HTTP/1.1: {exc.detail[:120]}") from None
            if reader.done:
                self._finish()
            if data is not None:
                yield data
            elif not reader.done:
                received = await _read(self._connection, self._timeout)
                if received:
                    reader.feed(received)
                    continue
                try:
                    reader.eof()
                except ProtocolError:
                    raise httpx.RemoteProtocolError(
                        "the upstream closed the connection inside the response body"
                    ) from None

    def _finish(self) -> None:
        """The body is complete: the connection goes back to the pool if it can carry another request."""
        connection, self._connection = self._connection, None
        self.complete = True
        if connection is None:
            return
        if self._keep_alive and not self._reader.until_close and not self._reader.leftover:
            self._transport.give_back(self._origin, connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:  # not read to its end: the connection cannot carry another request
            connection.close()


class _HttpxStream(httpx.AsyncByteStream):
    """An ``UpstreamResponse`` body as httpx reads one."""

    def __init__(self, response: UpstreamResponse) -> None:
        self.response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.response.chunks():
            yield chunk

    async def aclose(self) -> None:
        await self.response.aclose()
