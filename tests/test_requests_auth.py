"""meshauth.requests.ServiceAuth against a real loopback server."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
import requests

import meshauth
from meshauth.asgi import MeshAuthMiddleware
from meshauth.requests import ServiceAuth
from meshauth.testing import Mesh


class Recorder:
    """An ASGI app answering with the verified caller and subject."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        principal = scope["meshauth.principal"]
        body = json.dumps({"caller": principal.caller, "subject": principal.subject}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def _counting(app: Any, seen: list[str]) -> Any:
    async def counted(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        seen.append(headers.get(b"authorization", b"").decode())
        await app(scope, receive, send)

    return counted


@pytest.fixture
def live() -> Mesh:
    return Mesh(["orders", "payments", "billing", "gateway"])


def test_calls_carry_a_token_the_callee_verifies(live: Mesh, serve_asgi: Callable[..., str]) -> None:
    url = serve_asgi(MeshAuthMiddleware(Recorder(), live.verifier("payments")), lifespan="off")
    with requests.Session() as session:
        session.auth = ServiceAuth(live.identity("orders"), audience="payments")
        response = session.post(url + "/charges", json={"amount": 5}, timeout=10)
    assert response.status_code == 200
    assert response.json() == {"caller": "orders", "subject": "orders"}


def test_replayed_token_is_renewed_and_retried_once(live: Mesh, serve_asgi: Callable[..., str]) -> None:
    verifier = live.verifier("payments", replay_cache=meshauth.MemoryReplayCache(clock=live.clock))
    seen: list[str] = []
    url = serve_asgi(_counting(MeshAuthMiddleware(Recorder(), verifier), seen), lifespan="off")
    auth = ServiceAuth(live.identity("orders"), audience="payments")
    with requests.Session() as session:
        first = session.post(url + "/charges", data=b"one", timeout=10)
        # The identity's cached token was spent by the first call: the callee answers "replayed",
        # which a new token cures, so the call is retried once with a new token.
        second = session.post(url + "/charges", data=b"two", timeout=10, auth=auth)
        first_again = session.post(url + "/charges", data=b"one", timeout=10, auth=auth)
    assert first.status_code == 401  # no auth on the session: missing credentials
    assert second.status_code == 200 and [r.status_code for r in second.history] == []
    assert first_again.status_code == 200
    assert [r.status_code for r in first_again.history] == [401]
    assert seen[-2] != seen[-1], "the retry carries a new token"


def test_wrong_audience_is_logged_not_retried(
    live: Mesh, serve_asgi: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    url = serve_asgi(_counting(MeshAuthMiddleware(Recorder(), live.verifier("billing")), seen), lifespan="off")
    auth = ServiceAuth(live.identity("orders"), audience="payments")
    with caplog.at_level(logging.WARNING, logger="meshauth"):
        response = requests.get(url + "/invoices", auth=auth, timeout=10)
    assert response.status_code == 401 and len(seen) == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "meshauth"]
    assert "realm 'billing'" in warning and "audience 'payments'" in warning and "127.0.0.1:" in warning


def test_audience_by_host_mapping(live: Mesh, serve_asgi: Callable[..., str]) -> None:
    url = serve_asgi(MeshAuthMiddleware(Recorder(), live.verifier("payments")), lifespan="off")
    host_port = url.removeprefix("http://")
    auth = ServiceAuth(live.identity("orders"), audience={host_port: "payments", "127.0.0.1": "billing"})
    assert requests.get(url + "/x", auth=auth, timeout=10).status_code == 200
    with pytest.raises(meshauth.ConfigurationError) as caught:
        requests.get("http://localhost:9/x", auth=auth, timeout=10)
    assert caught.value.reason == "unknown_audience" and caught.value.actual == "localhost"


def _inbound_in_transaction(live: Mesh) -> meshauth.Principal:
    """What orders' middleware verified: the gateway's call inside alice's transaction."""
    txn = live.identity("gateway").issue_txn_token("alice")
    return live.verifier("orders").verify(live.identity("gateway").token_for("orders", txn_token=txn), txn)


def test_on_behalf_of_binds_each_call_to_the_transaction(live: Mesh, serve_asgi: Callable[..., str]) -> None:
    url = serve_asgi(MeshAuthMiddleware(Recorder(), live.verifier("payments")), lifespan="off")
    inbound = _inbound_in_transaction(live)
    auth = ServiceAuth(live.identity("orders"), audience="payments", on_behalf_of=inbound)
    response = requests.get(url + "/x", auth=auth, timeout=10)
    assert response.json() == {"caller": "orders", "subject": "alice"}
    # Without a Txn-Token, the callee sees the service itself.
    plain = ServiceAuth(live.identity("orders"), audience="payments", on_behalf_of=live.verifier("orders").verify(
        live.identity("billing").token_for("orders")))  # fmt: skip
    assert requests.get(url + "/x", auth=plain, timeout=10).json() == {"caller": "orders", "subject": "orders"}


def test_bad_audience_argument() -> None:
    with pytest.raises(meshauth.ConfigurationError):
        ServiceAuth(Mesh(["orders"]).identity("orders"), audience="")


def test_on_behalf_of_forwards_the_txn_token(live: Mesh, serve_asgi: Callable[..., str]) -> None:
    seen: list[dict[bytes, bytes]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(dict(scope["headers"]))
        await Recorder()(scope, receive, send)

    url = serve_asgi(MeshAuthMiddleware(app, live.verifier("payments")), lifespan="off")
    inbound = _inbound_in_transaction(live)
    auth = ServiceAuth(live.identity("orders"), "payments", on_behalf_of=inbound)
    for _ in range(2):
        assert requests.get(url + "/x", auth=auth, timeout=10).status_code == 200
    assert seen[0][b"txn-token"] == inbound.txn_token.encode()  # type: ignore[union-attr]
    assert seen[0][b"authorization"] == seen[1][b"authorization"]  # cached per (audience, Txn-Token)


def test_audience_callable_fresh_tokens_and_streamed_bodies(live: Mesh, serve_asgi: Callable[..., str]) -> None:
    verifier = live.verifier("payments", replay_cache=meshauth.MemoryReplayCache(clock=live.clock))
    seen: list[str] = []
    url = serve_asgi(_counting(MeshAuthMiddleware(Recorder(), verifier), seen), lifespan="off")
    by_path = ServiceAuth(live.identity("orders"), audience=lambda request: "payments", fresh_tokens=True)
    with requests.Session() as session:
        assert [session.get(url + "/x", auth=by_path, timeout=10).status_code for _ in range(2)] == [200, 200]
        cached = ServiceAuth(live.identity("orders"), audience="payments")
        assert session.get(url + "/x", auth=cached, timeout=10).status_code == 200
        # A generator body cannot be sent twice: the replayed cached token's 401 comes back as it is.
        streamed = session.post(url + "/x", data=iter([b"a", b"b"]), auth=cached, timeout=10)
    assert streamed.status_code == 401 and streamed.history == []
    assert len(seen) == 4 and len(set(seen[:2])) == 2, "fresh_tokens: a new token per request"
    with pytest.raises(meshauth.ConfigurationError) as caught:
        requests.get(url, auth=ServiceAuth(live.identity("orders"), audience=lambda request: ""), timeout=10)
    assert caught.value.reason == "unknown_audience"
