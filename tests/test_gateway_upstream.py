"""The gateway's upstream client (meshauth.gateway._upstream): pooling, retries, failures, on real sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from meshauth.gateway._upstream import UpstreamTransport
from tests.edge_mesh import LoggingUpstream


@pytest.fixture
def upstream() -> Iterator[LoggingUpstream]:
    server = LoggingUpstream()
    yield server
    server.close()


async def call(transport: UpstreamTransport, url: str, **options: object) -> tuple[int, bytes]:
    request = httpx.Request("GET", url, **options)  # type: ignore[arg-type]
    response = await transport.handle_async_request(request)
    body = b"".join([chunk async for chunk in response.aiter_raw()])
    await response.aclose()
    return response.status_code, body


def test_sequential_and_concurrent_requests_reuse_connections(upstream: LoggingUpstream) -> None:
    async def scenario() -> list[tuple[int, bytes]]:
        transport = UpstreamTransport(max_idle=8)
        url = f"http://127.0.0.1:{upstream.port}/orders/1"
        try:
            results = [await call(transport, url) for _ in range(5)]
            results += await asyncio.gather(*(call(transport, url) for _ in range(20)))
            results += await asyncio.gather(*(call(transport, url) for _ in range(20)))
            return results
        finally:
            await transport.aclose()

    results = asyncio.run(scenario())
    assert results == [(200, b'{"ok":true}')] * 45
    assert len(upstream.received) == 45
    # One connection for the sequential calls, reused by the first batch, which opens 19 more; 8 stay
    # idle (max_idle), so the second batch reuses 8 and opens 12.
    assert upstream.connections == 1 + 19 + 12


def test_bodies_are_sent_whole_with_either_framing(upstream: LoggingUpstream) -> None:
    async def chunks() -> object:
        for part in (b"abc", b"", b"defgh"):
            yield part

    async def scenario() -> None:
        transport = UpstreamTransport()
        url = f"http://127.0.0.1:{upstream.port}/orders"
        try:
            sized = httpx.Request("POST", url, content=b"0123456789")
            streamed = httpx.Request("POST", url, content=chunks())  # type: ignore[arg-type]
            for request in (sized, streamed):
                response = await transport.handle_async_request(request)
                await response.aread()
                assert response.status_code == 200
        finally:
            await transport.aclose()

    asyncio.run(scenario())
    assert upstream.received[0].body == b"0123456789"
    assert upstream.received[1].header(b"transfer-encoding") == b"chunked"
    assert upstream.received[1].body == b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n"


def test_a_connection_the_upstream_closed_is_replaced(upstream: LoggingUpstream) -> None:
    upstream.close_after = True

    async def scenario() -> list[tuple[int, bytes]]:
        transport = UpstreamTransport()
        try:
            return [await call(transport, f"http://127.0.0.1:{upstream.port}/x") for _ in range(5)]
        finally:
            await transport.aclose()

    assert asyncio.run(scenario()) == [(200, b'{"ok":true}')] * 5
    assert upstream.connections == 5


def test_a_whole_answer_frees_its_connection_even_unread(upstream: LoggingUpstream) -> None:
    async def scenario() -> None:
        transport = UpstreamTransport()
        url = f"http://127.0.0.1:{upstream.port}/x"
        try:
            response = await transport.handle_async_request(httpx.Request("GET", url))
            await response.aclose()  # never read, but its body came with the head: the connection is clean
            assert await call(transport, url) == (200, b'{"ok":true}')
        finally:
            await transport.aclose()

    asyncio.run(scenario())
    assert upstream.connections == 1


def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")  # 7 bytes still to come

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def scenario() -> None:
        transport = UpstreamTransport()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x"
        try:
            response = await transport.handle_async_request(httpx.Request("GET", url))
            await response.aclose()
            assert transport._idle.get(("http", "127.0.0.1", listener.getsockname()[1]), []) == []
        finally:
            await transport.aclose()

    try:
        asyncio.run(scenario())
        thread.join(timeout=5)
        accepted[0].settimeout(5)
        assert accepted[0].recv(1) == b""  # the gateway closed it
    finally:
        for conn in accepted:
            conn.close()
        listener.close()


def silent_server() -> tuple[socket.socket, threading.Event]:
    """Accepts connections and never answers (until released)."""
    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.1)
        while not release.is_set():
            try:
                held.append(listener.accept()[0])
            except (TimeoutError, OSError):
                continue
        for conn in held:
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener, release


def test_failures_are_httpx_errors() -> None:
    listener, release = silent_server()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]

    async def scenario() -> None:
        transport = UpstreamTransport()
        try:
            with pytest.raises(httpx.ConnectError):
                await call(transport, f"http://127.0.0.1:{refused_port}/x")
            port = listener.getsockname()[1]
            timeout = {"connect": 1.0, "read": 0.2, "write": 1.0}
            with pytest.raises(httpx.ReadTimeout):
                await call(transport, f"http://127.0.0.1:{port}/x", extensions={"timeout": timeout})
        finally:
            await transport.aclose()

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        listener.close()
