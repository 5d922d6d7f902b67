"""The gateway's HTTP/1.1 server: asyncio streams, with every limit of ``[limits]``.

uvicorn reads a request head without a deadline, so a client trickling one
header line every few seconds, or sending nothing, holds a connection for as
long as it likes; a thousand such clients exhaust the file descriptors and the
accept loop stops. This server owns the socket loop instead, so that each
phase of a connection has a deadline of its own:

- ``header_timeout`` for the whole request head, counted from accept (a new
  connection) or from its first byte (a kept-alive one); then ``408`` and close;
- ``idle_timeout`` between requests on a kept-alive connection; then close;
- ``body_timeout`` for each read of the request body and each write of the
  response; the application sees ``http.disconnect`` and the client ``408``;
- ``max_connections`` open connections; a connection beyond the cap is
  accepted, answered ``503`` and closed, so the accept loop never stalls;
- ``max_header_bytes`` (``431``) and ``max_body_bytes`` (``413``).

Framing is checked before the application runs: a request head with a bare
CR or LF, an obs-fold continuation line, both ``Content-Length`` and
``Transfer-Encoding``, a ``Connection`` header naming a framing header, a
duplicate ``Host`` or a target that is not origin-form (absolute-form, ``*``,
authority-form) gets ``400`` and the connection is closed. Each refusal
writes one audit record through ``on_refusal``.

Heads and bodies are parsed and encoded by ``_http11`` (h11's grammar and
framing rules, without a protocol state machine per request); a request runs
the ASGI application with ``scope``, ``receive`` and ``send`` as in ASGI 3.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final
from urllib.parse import unquote

from ._http11 import BodyReader, BodyWriter, Head, LocalProtocolError, ProtocolError, encode_response, parse_request
from ._server_config import Limits

__all__ = ["HTTPServer", "Refusal"]

logger = logging.getLogger("meshauth.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

_READ: Final = 65536
_LINGER: Final = 1.0
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding", b"host"})
# The status the client sees when the server cuts a request body short.
ABORTS: Final = {"body_timeout": 408, "body_too_large": 413, "bad_body": 400}


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """A request (or connection) the server answered itself, for the audit record."""

    status: int
    reason: str
    detail: str
    client: str | None
    method: str | None = None
    path: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()


class _Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail


class _Idle(Exception):
    """The connection ended between requests (closed, or idle past ``idle_timeout``)."""


def _canned(status: int, reason: str, *, close: bool = True) -> bytes:
    """A complete small JSON response, written as is (also when the request could not be parsed)."""
    body = json.dumps({"error": _ERRORS.get(status, "bad_request"), "reason": reason}).encode()
    head = (
        f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\ncache-control: no-store\r\n"
    )
    return (head + ("connection: close\r\n" if close else "") + "\r\n").encode() + body


_PHRASES: Final = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_ERRORS: Final = {
    408: "request_timeout",
    413: "payload_too_large",
    431: "headers_too_large",
    500: "server_error",
    501: "not_implemented",
    503: "unavailable",
    505: "http_version_not_supported",
}


class HTTPServer:
    """Serves an ASGI application on a listening socket with the given limits.

    ``on_refusal`` receives every request the server answers by itself (a
    timeout, a framing error, the connection cap), once, for the audit log.
    """

    def __init__(self, app: ASGIApp, limits: Limits, *, on_refusal: Callable[[Refusal], None]) -> None:
        self.app = app
        self.limits = limits
        self.on_refusal = on_refusal
        self.open = 0
        self._connections: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, sock: Any) -> None:
        """Start accepting on ``sock`` (a bound, listening socket)."""
        self._server = await asyncio.start_server(self._accept, sock=sock, limit=_READ)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, give open requests ``grace`` seconds, then cut the rest."""
        if self._server is not None:
            self._server.close()
        tasks = set(self._connections)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else None
        if self.open >= self.limits.max_connections:
            # Accept, answer and close: refusing to accept would leave the
            # connection in the kernel backlog and stall every other client.
            writer.write(_canned(503, "too_many_connections"))
            self.on_refusal(Refusal(503, "too_many_connections", "the gateway's connection cap is reached", client))
            await _close(reader, writer)
            return
        self.open += 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        connection = _Connection(self, reader, writer, peer)
        try:
            await connection.run()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if connection.pending is not None:
                connection.pending.cancel()
            await _close(reader, writer)
            self.open -= 1
            self._connections.discard(task)


async def _close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close after the client has read the response.

    Closing a socket that still holds unread request bytes sends a reset,
    which can destroy a response the client has not read yet; so the write
    side is shut first and what the client still sends is read and dropped,
    for at most ``_LINGER`` seconds.
    """
    with contextlib.suppress(OSError, RuntimeError):
        if not writer.is_closing() and writer.can_write_eof():
            writer.write_eof()
            async with asyncio.timeout(_LINGER):
                while await reader.read(_READ):
                    pass
    with contextlib.suppress(OSError, TimeoutError):
        writer.close()


class _Connection:
    """One client connection: request heads, bodies and responses in turn."""

    def __init__(self, server: HTTPServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any):
        self.server = server
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        sockname = writer.get_extra_info("sockname")
        self.local = (sockname[0], sockname[1]) if isinstance(sockname, tuple) else None
        self.buffer = b""
        self.pending: asyncio.Future[bytes] | None = None

    async def recv(self) -> bytes:
        """The next bytes from the client (a read left running by a disconnect watch first)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            return await pending
        return await self.reader.read(_READ)

    async def run(self) -> None:
        first = True
        while True:
            try:
                head = await self._read_head(first)
            except _Idle:
                return
            except _Refused as refused:
                await self._refuse(refused, None)
                return
            first = False
            try:
                request = parse_request(head)
            except ProtocolError as exc:
                await self._refuse(_Refused(exc.status, "bad_request", exc.detail[:200]), None)
                return
            try:
                _checked(request, self.limits)
            except _Refused as refused:
                await self._refuse(refused, request)
                return
            if not await _Exchange(self, request).run():
                return

    async def _read_head(self, first: bool) -> bytes:
        """The bytes of one request head, without its blank line; checked for bare CR/LF and obs-fold.

        What followed the head stays in ``buffer``.
        """
        limit = self.limits.max_header_bytes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.header_timeout if first or self.buffer else None
        while True:
            self.buffer = self.buffer.lstrip(b"\r\n") if self.buffer[:1] in (b"\r", b"\n") else self.buffer
            end = self.buffer.find(b"\r\n\r\n")
            scanned = self.buffer if end < 0 else self.buffer[: end + 4]
            if _bare_cr_or_lf(scanned):
                raise _Refused(400, "bad_line_ending", "a bare CR or LF in the request head")
            if b"\r\n " in scanned or b"\r\n\t" in scanned:
                raise _Refused(400, "obs_fold", "a header line continued on the next line (obs-fold)")
            if end >= 0:
                if end + 4 > limit:
                    break
                head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
                return head
            if len(self.buffer) > limit:
                break
            if deadline is None:
                data = await self._read_idle()
                deadline = loop.time() + self.limits.header_timeout
            else:
                data = await self._read_until(deadline, first)
            self.buffer += data
        raise _Refused(431, "headers_too_large", f"the request head exceeds {limit} bytes")

    async def _read_idle(self) -> bytes:
        try:
            async with asyncio.timeout(self.limits.idle_timeout):
                data = await self.recv()
        except TimeoutError:
            raise _Idle from None
        if not data:
            raise _Idle
        return data

    async def _read_until(self, deadline: float, first: bool) -> bytes:
        try:
            async with asyncio.timeout_at(deadline):
                data = await self.recv()
        except TimeoutError:
            raise _Refused(
                408, "header_timeout", f"the request head did not arrive within {self.limits.header_timeout:g} s"
            ) from None
        if not data:
            if first and not self.buffer:
                raise _Idle  # a connection opened and closed: nothing to answer
            raise _Refused(400, "incomplete_head", "the client closed the connection inside the request head")
        return data

    async def _refuse(self, refused: _Refused, request: Head | None) -> None:
        """Answer a request the application never sees, audit it, and close the connection."""
        client = self.client[0] if self.client else None
        record = Refusal(refused.status, refused.reason, refused.detail, client)
        if request is not None:
            record = dataclasses.replace(
                record,
                method=request.method.decode("latin-1"),
                path=request.target.partition(b"?")[0].decode("latin-1"),
                headers=tuple(request.headers),
            )
        self.server.on_refusal(record)
        await self.write(_canned(refused.status, refused.reason))

    async def write(self, data: bytes) -> None:
        """Write and wait for the kernel to take it, for no longer than ``body_timeout``."""
        writer = self.writer
        if writer.is_closing():
            return
        writer.write(data)
        if not writer.transport.get_write_buffer_size():
            return  # the kernel took it all: nothing to wait for
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                await self.writer.drain()
        except (TimeoutError, OSError):
            self.writer.transport.abort()


def _bare_cr_or_lf(data: bytes) -> bool:
    """Whether ``data`` holds a CR or an LF outside a CRLF pair (a CR at its very end may still get its LF).

    Counted rather than searched with a pattern: every request head is scanned.
    """
    pairs = data.count(b"\r\n")
    return data.count(b"\n") != pairs or data.count(b"\r") - data.endswith(b"\r") != pairs


def _checked(request: Head, limits: Limits) -> None:
    """Refuse a request whose framing or target leaves room for two readings."""
    target = request.target
    if not target.startswith(b"/"):
        kind = "'*'" if target == b"*" else "absolute-form" if b"://" in target else "authority-form"
        raise _Refused(400, "bad_target", f"the request target is {kind}; only an origin-form path is accepted")
    if request.content_length is not None and request.chunked:
        raise _Refused(400, "ambiguous_framing", "both Content-Length and Transfer-Encoding are present")
    if request.chunked and request.version != b"1.1":
        # RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing
        # (a 1.0 proxy in front may have read its body another way).
        raise _Refused(400, "ambiguous_framing", "Transfer-Encoding in an HTTP/1.0 request")
    for name, value in request.headers:
        if name == b"connection":
            named = {token.strip().lower() for token in value.split(b",")}
            if named & _FRAMING:
                detail = "Connection names Content-Length, Transfer-Encoding or Host"
                raise _Refused(400, "bad_connection_header", detail)
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise _Refused(413, "body_too_large", f"the request body exceeds {limits.max_body_bytes} bytes")


class _Exchange:
    """One request through the application: ``receive`` reads its body, ``send`` writes the response."""

    def __init__(self, connection: _Connection, request: Head) -> None:
        self.connection = connection
        self.request = request
        self.limits = connection.limits
        self.body = BodyReader.for_request(request)
        # 100 Continue is owed to a client waiting for it, until its body starts or the response does.
        self.continue_owed = request.expect_continue and not self.body.done and not connection.buffer
        if connection.buffer and not self.body.done:
            self.body.feed(connection.buffer)
            connection.buffer = b""
        self.received = 0
        self.body_done = False
        self.abort: str | None = None
        self.started = False
        self.complete = False
        self.close = not request.keep_alive
        self.gone = False
        self.unsent = b""
        self.writer: BodyWriter | None = None

    def scope(self) -> Scope:
        raw_path, _, query = self.request.target.partition(b"?")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.request.version.decode("ascii"),
            "server": self.connection.local,
            "client": self.connection.client,
            "scheme": "http",
            "method": self.request.method.decode("ascii"),
            "root_path": "",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.request.headers,
        }

    async def run(self) -> bool:
        """Run the application; whether the connection may carry another request."""
        try:
            await self.connection.server.app(self.scope(), self.receive, self.send)
        except Exception as exc:
            logger.error("gateway server: the application raised %s", type(exc).__name__)
            if not self.started:
                await self.connection.write(_canned(500, "internal_error"))
            return False
        if self.gone and self.abort is None:
            return False
        if not self.started:
            status = ABORTS.get(self.abort or "", 500)
            await self.connection.write(_canned(status, self.abort or "no_response"))
            return False
        if not (self.complete and not self.close and self._drained()):
            return False
        # Bytes of a pipelined next request: those that came with the body, then any read since.
        self.connection.buffer = self.body.leftover + self.connection.buffer
        return True

    def _drained(self) -> bool:
        """Whether the request is read to its end (a body the app left unread only if it is already here)."""
        body = self.body
        try:
            while body.next() is not None:
                pass
        except ProtocolError:
            return False
        return body.done

    async def receive(self) -> Message:
        if self.body_done or self.abort is not None or self.gone:
            return await self._wait_for_disconnect()
        if self.continue_owed:
            self.continue_owed = False
            await self.connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.body
        while True:
            try:
                data = body.next()
            except ProtocolError:
                return self._aborted("bad_body")
            if data is not None:
                self.received += len(data)
                if self.received > self.limits.max_body_bytes:
                    return self._aborted("body_too_large")
                return {"type": "http.request", "body": data, "more_body": True}
            if body.done:
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            data = await self._read_body()
            if data is None:
                return self._aborted("body_timeout")
            if not data:
                self.gone = True
                return {"type": "http.disconnect"}
            body.feed(data)

    async def _read_body(self) -> bytes | None:
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                return await self.connection.recv()
        except TimeoutError:
            return None

    def _aborted(self, reason: str) -> Message:
        self.abort = reason
        return {"type": "http.disconnect", "meshauth.reason": reason, "meshauth.status": ABORTS[reason]}

    async def _wait_for_disconnect(self) -> Message:
        """Block until the client closes; bytes of a pipelined next request are kept for it."""
        connection = self.connection
        while not self.gone and len(connection.buffer) <= self.limits.max_header_bytes:
            if connection.pending is None:
                connection.pending = asyncio.ensure_future(connection.reader.read(_READ))
            # Shielded: the application cancels this wait when its response is done, and
            # the read goes on, so the bytes of a next request are not lost to the cancellation.
            data = await asyncio.shield(connection.pending)
            connection.pending = None
            if not data:
                self.gone = True
                break
            connection.buffer += data
        if not self.gone:
            await asyncio.Event().wait()  # nothing more to learn; the caller cancels this wait
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            self.continue_owed = False
            # Held back until the body: head, body and end then leave in one write (one system call)
            # when the body comes in one message, as most do.
            self.unsent = self._encode_head(message["status"], message.get("headers", ()))
        elif kind == "http.response.body":
            writer = self.writer
            if writer is None or self.complete:
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            try:
                data = self.unsent + writer.data(body) if body else self.unsent
                if not more:
                    data += writer.end()
            except LocalProtocolError as exc:
                self._broken(exc)
                return
            self.unsent = b""
            self.complete = not more
            if data and not self.gone and not self.connection.writer.is_closing():
                # A client that left learns nothing more; the application finds out from receive().
                await self.connection.write(data)

    def _encode_head(self, status: int, headers: Any) -> bytes:
        request = self.request
        try:
            head, self.writer, close = encode_response(
                status, headers, method=request.method, version=request.version, keep_alive=request.keep_alive
            )
        except LocalProtocolError as exc:
            self._broken(exc)
            return b""
        self.close = self.close or close
        return b"" if self.gone else head

    def _broken(self, exc: Exception) -> None:
        logger.error("gateway server: cannot send the response: %s", str(exc)[:200])
        self.connection.writer.transport.abort()
        self.gone = True
        self.writer = None
