"""The gateway behind a loopback "proxy", as a real process: canonical paths and forwarded headers.

The test itself plays the trusted proxy (it connects from 127.0.0.1, which the
gateway trusts) and sends what a client could have put in front of it; a
logging upstream records the exact request target and headers the gateway
forwarded. Each audit record a test reads is found by the trace id its request
carried in ``traceparent`` (the gateway continues it): records are written in
batches after their responses, so "the last record" may still be an earlier
request's.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.edge_mesh import EdgeGateway, LoggingUpstream, running, write_gateway

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream() -> Iterator[LoggingUpstream]:
    server = LoggingUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: LoggingUpstream) -> Iterator[EdgeGateway]:
    edge = write_gateway(tmp_path_factory.mktemp("proxied"), upstream.port, 'trusted_proxies = ["127.0.0.1/32"]')
    with running(edge):
        yield edge


def send(gateway: EdgeGateway, target: str, *headers: str) -> tuple[int, bytes]:
    lines = [f"GET {target} HTTP/1.1", "Host: gw.example", f"Authorization: Bearer {gateway.user_token()}", *headers]
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def traced() -> tuple[str, str]:
    """A fresh trace id and the ``traceparent`` header line that carries it."""
    trace_id = uuid.uuid4().hex
    return trace_id, f"traceparent: 00-{trace_id}-{uuid.uuid4().hex[:16]}-01"


def record_of(gateway: EdgeGateway, trace_id: str, wait: float = 5.0) -> dict[str, Any]:
    """The one audit record of the request traced as ``trace_id``, once it is written (within ``wait``)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            records = [record for record in gateway.audit() if record.get("trace_id") == trace_id]
        except ValueError:  # a line read while it was being appended
            records = []
        if records or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(records) == 1, f"{len(records)} audit records of trace {trace_id}"
    record: dict[str, Any] = records[0]
    return record


@pytest.mark.parametrize(
    "target",
    [
        "/orders/..;/admin",
        "/orders/..%3B/admin",
        "//orders/1",
        "/ORDERS/1",
        "/orders;x/1",
        "/orders./1",
        "/orders%2e/1",
        "/orders/a%2Fb",
    ],
)
def test_paths_another_server_would_route_elsewhere_are_refused(
    gateway: EdgeGateway, upstream: LoggingUpstream, target: str
) -> None:
    before = len(upstream.received)
    status, body = send(gateway, target)
    assert (status, json.loads(body)["reason"]) == (400, "bad_path")
    assert len(upstream.received) == before


def test_a_climb_out_of_a_route_is_judged_where_it_lands(gateway: EdgeGateway, upstream: LoggingUpstream) -> None:
    before = len(upstream.received)
    status, body = send(gateway, "/orders/x/../../admin")
    assert (status, json.loads(body)["reason"]) == (404, "no_route")  # judged as /admin: no route
    assert len(upstream.received) == before


def test_the_judged_path_is_forwarded_byte_for_byte(gateway: EdgeGateway, upstream: LoggingUpstream) -> None:
    assert send(gateway, "/orders/%7Ealice/./cart%3b?x=1")[0] == 200
    assert upstream.received[-1].target == b"/orders/~alice/cart%3B?x=1"


def test_forwarded_values_are_the_proxys_rightmost_ones(gateway: EdgeGateway, upstream: LoggingUpstream) -> None:
    trace_id, traceparent = traced()
    status, _ = send(
        gateway,
        "/orders/1",
        traceparent,
        "X-Forwarded-For: 1.1.1.1, ::ffff:198.51.100.7",
        "X-Forwarded-Proto: https, http",
        "X-Forwarded-Host: evil.example, gw.example",
        "X-Original-URL: /admin",
        "X-Forwarded-Prefix: /admin",
    )
    assert status == 200
    seen = upstream.received[-1]
    assert seen.header(b"x-forwarded-proto") == b"http"
    assert seen.header(b"x-forwarded-host") == b"gw.example"
    assert seen.header(b"x-original-url") is None
    assert seen.header(b"x-forwarded-prefix") is None
    assert record_of(gateway, trace_id)["client"] == "198.51.100.7"


def test_dropped_headers_are_dropped_in_their_underscore_spelling(
    gateway: EdgeGateway, upstream: LoggingUpstream
) -> None:
    """A WSGI upstream reads X_Meshauth_Principal as X-Meshauth-Principal: neither spelling gets through."""
    status, _ = send(
        gateway,
        "/orders/1",
        "X_Meshauth_Principal: ceo",
        "Txn_Token: forged",
        "X_Forwarded_For: 10.9.9.9",
        "X_Original_URL: /admin",
        "X_Forwarded_Authorization: Bearer forged",
        "X_Custom_Thing: kept",
    )
    assert status == 200
    names = {name.lower() for name, _ in upstream.received[-1].headers}
    assert not {n for n in names if b"_" in n and n.replace(b"_", b"-") in DROPPED_SPELLINGS}, names
    assert upstream.received[-1].header(b"txn-token") != b"forged"  # the gateway's own Txn-Token only
    assert b"x_custom_thing" in names  # other underscored names pass as they are
    assert upstream.received[-1].header(b"x-forwarded-for") == b"127.0.0.1"  # the gateway's own view


DROPPED_SPELLINGS = {
    b"x-meshauth-principal",
    b"txn-token",
    b"x-original-url",
    b"x-forwarded-authorization",
}


def test_a_long_forwarded_chain_is_walked_no_further_than_the_cap(
    gateway: EdgeGateway, upstream: LoggingUpstream
) -> None:
    chain = ", ".join(["198.51.100.9"] + ["127.0.0.1"] * 1000)  # within the 16 KiB head
    trace_id, traceparent = traced()
    status, _ = send(gateway, "/orders/1", traceparent, f"X-Forwarded-For: {chain}")
    assert status == 200
    forwarded = upstream.received[-1].header(b"x-forwarded-for")
    assert forwarded is not None and len(forwarded.split(b",")) <= 11
    assert record_of(gateway, trace_id)["client"] == "127.0.0.1"  # 198.51.100.9 is beyond the cap
