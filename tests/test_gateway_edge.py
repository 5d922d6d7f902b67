"""The gateway at the edge, over raw sockets: framing, bad input and connection limits (DESIGN section 8).

A real ``python -m meshauth.gateway`` process with small limits (1 s timeouts,
a 4 KiB head, a 1000-byte body, 40 connections) stands in front of a logging
upstream that records the exact request line it received and answers with
hop-by-hop and ``Meshauth-*`` headers of its own. Every probe must get a clear
4xx/5xx, write exactly one audit record, and leave the gateway serving others.
Audit records are written in batches after their responses, so every count of
records is taken once the log has settled (see ``settled``).
"""

from __future__ import annotations

import http.client
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.edge_mesh import EdgeGateway, LoggingUpstream, running, write_gateway

pytestmark = pytest.mark.slow

LIMITS = """
[limits]
header_timeout = 1
idle_timeout = 1
body_timeout = 1
max_connections = 40
max_header_bytes = 4096
max_body_bytes = 1000
"""
UPSTREAM_HEADERS = [
    (b"connection", b"x-hop"),
    (b"x-hop", b"secret"),
    (b"keep-alive", b"timeout=99"),
    (b"proxy-authenticate", b"Basic"),
    (b"upgrade", b"h2c"),
    (b"meshauth-response", b"forged"),
    (b"x-meshauth-principal", b"root"),
    (b"x-kept", b"yes"),
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[LoggingUpstream]:
    server = LoggingUpstream(UPSTREAM_HEADERS)
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: LoggingUpstream) -> Iterator[EdgeGateway]:
    edge = write_gateway(tmp_path_factory.mktemp("edge"), upstream.port, LIMITS)
    with running(edge):
        yield edge


def response_of(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


def exchange(gateway: EdgeGateway, data: bytes, timeout: float = 5.0) -> http.client.HTTPResponse:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as sock:
        sock.sendall(data)
        return response_of(sock)


def get(gateway: EdgeGateway, target: str = "/orders/1", token: str | None = None) -> http.client.HTTPResponse:
    auth = f"Authorization: Bearer {token or gateway.user_token()}\r\n"
    return exchange(gateway, f"GET {target} HTTP/1.1\r\nHost: gw\r\n{auth}\r\n".encode())


def closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closed ``sock`` (reading whatever it sent), bounded by ``limit``."""
    started = time.monotonic()
    sock.settimeout(limit)
    received = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return time.monotonic() - started, received
        received += data


def settled(gateway: EdgeGateway, wait: float = 5.0) -> int:
    """The number of audit records once those of every request answered so far are written.

    A request of its own, with a fresh trace id, marks the point: the gateway (one
    process) writes records in the order it made them, so once this request's record
    is in the log, so are the earlier ones, and the count is taken after it.
    """
    trace_id = uuid.uuid4().hex
    marker = f"GET /settled HTTP/1.1\r\nHost: gw\r\ntraceparent: 00-{trace_id}-{uuid.uuid4().hex[:16]}-01\r\n\r\n"
    assert exchange(gateway, marker.encode()).status == 404
    deadline = time.monotonic() + wait
    while True:
        try:
            traces = [record.get("trace_id") for record in gateway.audit()]
        except ValueError:  # a line read while it was being appended
            traces = []
        if trace_id in traces:
            return traces.index(trace_id) + 1
        assert time.monotonic() < deadline, f"no audit record of trace {trace_id} within {wait} s"
        time.sleep(0.02)


def one_new_record(gateway: EdgeGateway, before: int) -> dict[str, Any]:
    records = gateway.records_after(before)
    time.sleep(0.1)  # a second record, if any, would be written by now
    records = gateway.audit()[before:]
    assert len(records) == 1, records
    record: dict[str, Any] = records[0]
    assert record["event"] == "gateway.request" and len(record["trace_id"]) == 32
    return record


def still_serving(gateway: EdgeGateway) -> None:
    before = settled(gateway)
    assert get(gateway).status == 200
    assert one_new_record(gateway, before)["reason"] == "ok"


# -- framing and bad input ------------------------------------------------------------------------------

BAD_HEADS = {
    "both Content-Length and Transfer-Encoding": (
        b"POST /orders HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "ambiguous_framing",
    ),
    "Transfer-Encoding in HTTP/1.0": (
        b"POST /orders HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
        "ambiguous_framing",
    ),
    "Connection naming Content-Length": (
        b"POST /orders HTTP/1.1\r\nHost: gw\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\nabc",
        400,
        "bad_connection_header",
    ),
    "absolute-form target": (b"GET http://orders.internal/admin HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "bad_target"),
    "asterisk target": (b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "bad_target"),
    "authority-form target": (b"CONNECT orders.internal:443 HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "bad_target"),
    "obs-fold": (b"GET /orders HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\n folded\r\n\r\n", 400, "obs_fold"),
    "bare LF": (b"GET /orders HTTP/1.1\nHost: gw\n\n", 400, "bad_line_ending"),
    "bare CR": (b"GET /orders HTTP/1.1\r\nHost: gw\rX-A: 1\r\n\r\n", 400, "bad_line_ending"),
    "duplicate Host": (b"GET /orders HTTP/1.1\r\nHost: gw\r\nHost: admin\r\n\r\n", 400, "bad_request"),
    "oversized header block": (
        b"GET /orders HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
    "declared body too large": (
        b"POST /orders HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n",
        413,
        "body_too_large",
    ),
}


@pytest.mark.parametrize("probe", list(BAD_HEADS))
def test_bad_request_heads_are_refused_before_the_upstream(
    gateway: EdgeGateway, upstream: LoggingUpstream, probe: str
) -> None:
    data, status, reason = BAD_HEADS[probe]
    before, forwarded = settled(gateway), len(upstream.received)
    response = exchange(gateway, data)
    assert response.status == status
    assert response.getheader("connection") == "close"
    record = one_new_record(gateway, before)
    assert (record["status"], record["reason"], record["outcome"]) == (status, reason, "rejected")
    assert len(upstream.received) == forwarded
    still_serving(gateway)


def test_the_upstream_receives_the_exact_target_and_its_response_headers_are_cleaned(
    gateway: EdgeGateway, upstream: LoggingUpstream
) -> None:
    before = settled(gateway)
    response = get(gateway, "/orders/a%2Bb/c?x=%2F&y=1")
    assert response.status == 200
    assert upstream.received[-1].target == b"/orders/a%2Bb/c?x=%2F&y=1"
    names = {name.lower() for name, _ in response.getheaders()}
    # Hop-by-hop (declared or standard) and Meshauth-* headers stop at the gateway; others pass.
    assert not names & {"x-hop", "keep-alive", "proxy-authenticate", "upgrade", "meshauth-response"}
    assert "x-meshauth-principal" not in names and response.getheader("x-kept") == "yes"
    assert one_new_record(gateway, before)["reason"] == "ok"


def test_a_canonical_path_probe_is_refused(gateway: EdgeGateway, upstream: LoggingUpstream) -> None:
    before, forwarded = settled(gateway), len(upstream.received)
    assert get(gateway, "/orders/..;/admin").status == 400
    assert one_new_record(gateway, before)["reason"] == "bad_path"
    assert len(upstream.received) == forwarded


def test_a_chunked_body_beyond_max_body_bytes_is_413(gateway: EdgeGateway, upstream: LoggingUpstream) -> None:
    before, forwarded = settled(gateway), len(upstream.received)
    chunk = b"258\r\n" + b"x" * 600 + b"\r\n"
    head = f"POST /orders HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gateway.user_token()}\r\n"
    response = exchange(gateway, head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 2 + b"0\r\n\r\n")
    assert response.status == 413
    record = one_new_record(gateway, before)
    assert (record["status"], record["reason"]) == (413, "body_too_large")
    assert len(upstream.received) == forwarded  # the upstream never saw a complete request
    still_serving(gateway)


def test_a_body_that_stalls_gets_408_after_body_timeout(gateway: EdgeGateway) -> None:
    before = settled(gateway)
    head = f"POST /orders HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gateway.user_token()}\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head.encode() + b"Content-Length: 10\r\n\r\nabc")
        started = time.monotonic()
        response = response_of(sock)
        waited = time.monotonic() - started
    assert response.status == 408 and 0.8 <= waited <= 3.0
    record = one_new_record(gateway, before)
    assert (record["status"], record["reason"]) == (408, "body_timeout")
    still_serving(gateway)


def test_a_client_that_leaves_mid_body_is_audited_once(gateway: EdgeGateway) -> None:
    before = settled(gateway)
    head = f"POST /orders HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gateway.user_token()}\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head.encode() + b"Content-Length: 100\r\n\r\nabc")
    record = one_new_record(gateway, before)
    assert (record["status"], record["reason"]) == (499, "client_disconnected")
    still_serving(gateway)


def test_pipelined_requests_are_answered_in_order(gateway: EdgeGateway) -> None:
    token = gateway.user_token()
    one = f"GET /orders/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    before = settled(gateway)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(one + one.replace(b"/orders/1", b"/nowhere"))
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
            received += sock.recv(65536)
    statuses = [int(part.split(b" ", 1)[0]) for part in received.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 404]
    assert [record["reason"] for record in gateway.records_after(before, expected=2)] == ["ok", "no_route"]


def test_a_streamed_response_leaves_the_connection_usable(gateway: EdgeGateway) -> None:
    """While a response without Content-Length streams, the server watches for the client leaving;
    the watch must not take the next request's bytes or the socket from the next read."""
    token = gateway.user_token()
    one = f"GET /orders/stream HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    before = settled(gateway)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        for _ in range(3):
            sock.sendall(one)
            received = b""
            while not received.endswith(b"0\r\n\r\n"):
                received += sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200 ") and b'{"ok":true}' in received
    assert [record["reason"] for record in gateway.records_after(before, expected=3)] == ["ok"] * 3
    still_serving(gateway)


def read_response(sock: socket.socket, method: str = "GET") -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    response.read()
    return response


def test_a_head_request_gets_a_head_only_and_the_connection_stays_usable(
    gateway: EdgeGateway, upstream: LoggingUpstream
) -> None:
    """The logging upstream wrongly sends a body with its answer to HEAD: it is not relayed (nor kept
    on the upstream connection to be read as the next answer)."""
    token = gateway.user_token()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(f"HEAD /orders/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        head = read_response(sock, "HEAD")
        assert head.status == 200 and head.getheader("content-length") == "11"
        for _ in range(2):
            sock.sendall(f"GET /orders/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert (response.status, response.read()) == (200, b'{"ok":true}')
    assert upstream.received[-3].request_line.startswith(b"HEAD /orders/1 ")


def test_an_http_1_0_request_is_answered_and_the_connection_closed(gateway: EdgeGateway) -> None:
    token = gateway.user_token()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(f"GET /orders/1 HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        _, received = closed_after(sock, 5)
    assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b'{"ok":true}')
    assert b"\r\nconnection: close\r\n" in received.lower()


def test_a_client_waiting_for_100_continue_gets_it_and_its_body_goes_upstream(
    gateway: EdgeGateway, upstream: LoggingUpstream
) -> None:
    token = gateway.user_token()
    head = f"POST /orders HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head.encode() + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += sock.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert read_response(sock).status == 200
    assert upstream.received[-1].body == b"hello" and upstream.received[-1].header(b"expect") is None


def test_a_chunked_request_body_is_forwarded_chunked(gateway: EdgeGateway, upstream: LoggingUpstream) -> None:
    token = gateway.user_token()
    head = f"POST /orders HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    response = exchange(gateway, head.encode() + b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert response.status == 200
    forwarded = upstream.received[-1]
    assert forwarded.header(b"transfer-encoding") == b"chunked" and forwarded.body.endswith(b"0\r\n\r\n")
    assert b"abc" in forwarded.body and b"de" in forwarded.body and b"ext" not in forwarded.body


# -- connection limits ------------------------------------------------------------------------------------


def test_a_head_sent_one_line_at_a_time_is_cut_at_header_timeout(gateway: EdgeGateway) -> None:
    before = settled(gateway)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /orders HTTP/1.1\r\n")
        started = time.monotonic()
        sock.settimeout(0.3)
        received = b""
        for index in range(20):  # a header line every 0.3 s; the whole head is due within 1 s
            try:
                sock.sendall(f"X-Line-{index}: 1\r\n".encode())
                received += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if received:
                break
        waited = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 ") and 0.8 <= waited <= 3.0
    record = one_new_record(gateway, before)
    assert (record["status"], record["reason"]) == (408, "header_timeout")


def test_a_silent_connection_is_closed_at_header_timeout(gateway: EdgeGateway) -> None:
    before = settled(gateway)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        waited, received = closed_after(sock, 5.0)
    assert received.startswith(b"HTTP/1.1 408 ") and 0.8 <= waited <= 3.0
    assert one_new_record(gateway, before)["reason"] == "header_timeout"


def test_an_idle_keep_alive_connection_is_closed_at_idle_timeout(gateway: EdgeGateway) -> None:
    before = settled(gateway)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert response_of(sock).status == 200
        waited, received = closed_after(sock, 5.0)
    assert received == b"" and 0.8 <= waited <= 3.0
    time.sleep(0.1)
    assert len(gateway.audit()) == before  # an idle close is not a request


def test_1100_idle_sockets_do_not_stop_the_gateway(gateway: EdgeGateway) -> None:
    """Beyond ``max_connections`` new connections get 503 at once; the held ones end at header_timeout."""
    before = settled(gateway)
    sockets = []
    try:
        for _ in range(1100):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
            sock.sendall(b"GET /orders HTTP/1.1\r\n")
            sockets.append(sock)
        statuses = []
        for sock in sockets:
            _waited, received = closed_after(sock, 5.0)
            statuses.append(int(received.split(b" ")[1]))
    finally:
        for sock in sockets:
            sock.close()
    # Held connections free their slot after header_timeout, so later ones may be admitted in turn.
    refused, timed_out = statuses.count(503), statuses.count(408)
    assert refused + timed_out == 1100 and timed_out >= 40 and refused >= 500
    reasons = [record["reason"] for record in gateway.records_after(before, expected=1100)]
    assert reasons.count("too_many_connections") == refused and reasons.count("header_timeout") == timed_out
    response = exchange(gateway, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert response.status == 200
    still_serving(gateway)


def test_the_audit_log_keeps_one_line_per_record(gateway: EdgeGateway, tmp_path: Path) -> None:
    """A subject with U+2028, U+0085 and an escape sequence cannot split or colour the log."""
    subject = "eve\u2028forged\u0085record\x1b[31m\u2029"
    before = settled(gateway)
    assert get(gateway, token=gateway.user_token(subject)).status == 200
    gateway.records_after(before)
    tail = gateway.audit_log.read_text(encoding="utf-8").splitlines()[before:]
    assert len(tail) == 1 and not any(ch in tail[0] for ch in "\u2028\u2029\u0085\x1b")
    assert gateway.audit()[before]["subject"] == subject
