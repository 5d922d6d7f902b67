"""Response tokens bind what was answered: an intermediary that changes the answer is caught.

payments runs behind the real middleware (with identity=) on a loopback server; an intermediary,
another loopback server, relays to it and rewrites what comes back, keeping the genuine
Meshauth-Response header. orders calls through the intermediary with ServiceAuth(verify_responses=).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import meshauth
from meshauth.asgi import MeshAuthMiddleware
from meshauth.testing import LoopbackServer

DECLINED = {"charge": "declined"}


async def payments_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = json.dumps(DECLINED).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


Rewrite = Callable[[int, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


def intermediary(upstream: str, rewrite: Rewrite) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k.lower() != b"host"}
        async with httpx.AsyncClient() as client:
            answer = await client.get(upstream + scope["path"], headers=headers)
        status, out, body = rewrite(answer.status_code, dict(answer.headers), answer.content)
        out.pop("content-length", None)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in out.items()],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[meshauth.ServiceIdentity, meshauth.StaticKeys, str]]:
    keys_by_name = {name: meshauth.SigningKey.generate() for name in ("orders", "payments")}
    registry = meshauth.StaticKeys.from_jwks({"keys": [k.public_jwk(iss=n) for n, k in keys_by_name.items()]})
    payments = meshauth.ServiceIdentity("payments", keys_by_name["payments"])
    app = MeshAuthMiddleware(payments_app, meshauth.Verifier("payments", registry), identity=payments)
    with LoopbackServer(app, lifespan="off") as server:
        yield meshauth.ServiceIdentity("orders", keys_by_name["orders"]), registry, server.url


def call_through(world: tuple[meshauth.ServiceIdentity, meshauth.StaticKeys, str], rewrite: Rewrite) -> httpx.Response:
    orders, registry, upstream = world
    auth = meshauth.ServiceAuth(orders, audience="payments", verify_responses=registry)
    with LoopbackServer(intermediary(upstream, rewrite), lifespan="off") as relay, httpx.Client(auth=auth) as client:
        return client.get(relay.url + "/charges/c_1")


def test_an_honest_relay_is_accepted(world: Any) -> None:
    response = call_through(world, lambda status, headers, body: (status, headers, body))
    assert response.json() == DECLINED


CHANGED_ANSWERS = pytest.mark.parametrize(
    ("rewrite", "reason"),
    [
        (lambda s, h, b: (201, h, b'{"charge": "approved"}'), "status_mismatch"),
        (lambda s, h, b: (s, h, b'{"charge": "approved"}'), "body_mismatch"),
        (lambda s, h, b: (401, {"www-authenticate": 'Bearer realm="payments"'}, b"{}"), "missing_response"),
        (lambda s, h, b: (503, {"retry-after": "5"}, b"{}"), "missing_response"),
        (lambda s, h, b: (s, {k: v for k, v in h.items() if k != "meshauth-response"}, b), "missing_response"),
    ],
    ids=["status and body swapped", "body swapped", "forged 401", "forged 503", "token stripped"],
)


@CHANGED_ANSWERS
def test_a_changed_answer_is_caught(world: Any, rewrite: Rewrite, reason: str) -> None:
    with pytest.raises(meshauth.ResponseAuthError) as info:
        call_through(world, rewrite)
    assert info.value.reason == reason


# -- the same checks from the requests client ------------------------------------------------


def call_through_requests(world: tuple[meshauth.ServiceIdentity, meshauth.StaticKeys, str], rewrite: Rewrite) -> Any:
    import requests

    from meshauth.requests import ServiceAuth

    orders, registry, upstream = world
    with LoopbackServer(intermediary(upstream, rewrite), lifespan="off") as relay, requests.Session() as session:
        session.auth = ServiceAuth(orders, audience="payments", verify_responses=registry)
        return session.get(relay.url + "/charges/c_1", timeout=10)


def test_requests_accepts_an_honest_relay(world: Any) -> None:
    response = call_through_requests(world, lambda status, headers, body: (status, headers, body))
    assert response.status_code == 200
    assert response.json() == DECLINED


@CHANGED_ANSWERS
def test_requests_catches_a_changed_answer(world: Any, rewrite: Rewrite, reason: str) -> None:
    with pytest.raises(meshauth.ResponseAuthError) as info:
        call_through_requests(world, rewrite)
    assert info.value.reason == reason


def test_requests_checks_the_compressed_bytes_as_sent_and_still_decodes_them(serve_asgi: Any) -> None:
    """The token binds the gzip bytes on the wire; requests hands out the decoded JSON as usual."""
    import gzip

    import requests

    from meshauth.requests import ServiceAuth

    async def gzipped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = gzip.compress(json.dumps(DECLINED).encode())
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    mesh = meshauth.testing.Mesh(["orders", "payments"])
    app = MeshAuthMiddleware(gzipped, mesh.verifier("payments"), identity=mesh.identity("payments"))
    url = serve_asgi(app, lifespan="off")
    with requests.Session() as session:
        session.auth = ServiceAuth(mesh.identity("orders"), audience="payments", verify_responses=mesh.keys)
        response = session.get(url + "/charges/c_1", timeout=10)
    assert response.headers["content-encoding"] == "gzip"
    assert response.json() == DECLINED


def test_requests_retry_sends_a_new_nonce_and_checks_the_second_answer(serve_asgi: Any) -> None:
    """A replayed token is refused (401, itself signed); the retry's answer is checked with its own nonce."""
    import requests

    from meshauth.requests import ServiceAuth

    mesh = meshauth.testing.Mesh(["orders", "payments"])
    nonces: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await payments_app(scope, receive, send)

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonces.append(dict(scope["headers"]).get(b"meshauth-nonce", b"").decode())
        await guarded(scope, receive, send)

    verifier = mesh.verifier("payments", replay_cache=meshauth.MemoryReplayCache())
    guarded = MeshAuthMiddleware(app, verifier, identity=mesh.identity("payments"))
    url = serve_asgi(recording, lifespan="off")
    with requests.Session() as session:
        session.auth = ServiceAuth(mesh.identity("orders"), audience="payments", verify_responses=mesh.keys)
        assert session.get(url + "/a", timeout=10).json() == DECLINED
        second = session.get(url + "/b", timeout=10)  # the cached token again: replayed, then renewed
    assert second.status_code == 200 and second.json() == DECLINED
    assert [r.status_code for r in second.history] == [401]
    assert len(nonces) == 3 and len(set(nonces)) == 3 and all(nonces)


def test_requests_does_not_buffer_a_swapped_body_past_the_bound(world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import meshauth.requests

    monkeypatch.setattr(meshauth.requests, "MAX_BOUND_BODY", 1000)
    with pytest.raises(meshauth.BodyMismatch, match="grows past 1000 bytes"):
        call_through_requests(world, lambda s, h, b: (s, h, b"x" * 5000))


def test_requests_reports_a_cut_off_bound_body_as_requests_does(world: Any) -> None:
    """A relay that closes mid-body: the caller gets requests' own ChunkedEncodingError, not a urllib3 one."""
    import socket
    import threading

    import requests

    from meshauth.requests import ServiceAuth

    orders, registry, upstream = world
    listener = socket.create_server(("127.0.0.1", 0))

    def relay() -> None:
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            lines = head.split(b"\r\n")[1:]
            headers = dict(line.split(b": ", 1) for line in lines if b": " in line)
            forwarded = {k.decode(): v.decode() for k, v in headers.items() if k.lower() != b"host"}
            answer = httpx.get(upstream + "/charges/c_1", headers=forwarded)
            status = f"HTTP/1.1 {answer.status_code} OK\r\n".encode()
            token = answer.headers["meshauth-response"].encode()
            body = answer.content
            conn.sendall(
                status + b"Meshauth-Response: " + token + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5]
            )

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        with requests.Session() as session:
            session.auth = ServiceAuth(orders, audience="payments", verify_responses=registry)
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                session.get(f"http://127.0.0.1:{listener.getsockname()[1]}/charges/c_1", timeout=10)
    finally:
        thread.join(10)
        listener.close()
