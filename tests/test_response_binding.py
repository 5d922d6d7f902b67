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


@pytest.mark.parametrize(
    ("rewrite", "reason"),
    [
        (lambda s, h, b: (201, h, b'{"charge": "approved"}'), "status_mismatch"),
        (lambda s, h, b: (s, h, b'{"charge": "approved"}'), "body_mismatch"),
        (lambda s, h, b: (401, {"www-authenticate": 'Bearer realm="payments"'}, b"{}"), "missing_response"),
        (lambda s, h, b: (503, {"retry-after": "5"}, b"{}"), "missing_response"),
    ],
    ids=["status and body swapped", "body swapped", "forged 401", "forged 503"],
)
def test_a_changed_answer_is_caught(world: Any, rewrite: Rewrite, reason: str) -> None:
    with pytest.raises(meshauth.ResponseAuthError) as info:
        call_through(world, rewrite)
    assert info.value.reason == reason
