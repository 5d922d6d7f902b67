"""gateway -> orders -> payments on behalf of alice, with mutual auth on every hop.

The chain must be visible in each service's Principal and in each service's audit record.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

import meshauth
from meshauth._mutual import new_nonce
from meshauth.asgi import MeshAuthMiddleware
from meshauth.testing import Mesh


def _services(mesh: Mesh) -> tuple[Any, list[meshauth.Principal]]:
    seen: list[meshauth.Principal] = []

    async def payments(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["meshauth.principal"])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"charged"})

    payments_app = MeshAuthMiddleware(
        payments,
        mesh.verifier("payments"),
        policy=meshauth.Policy.from_dict(
            {
                "delegators": ["gateway", "orders"],
                "rules": [{"callers": ["orders"], "subjects": ["alice"], "paths": ["/charges"]}],
            }
        ),
        identity=mesh.identity("payments"),
    )

    async def orders(scope: dict[str, Any], receive: Any, send: Any) -> None:
        principal = scope["meshauth.principal"]
        seen.append(principal)
        auth = meshauth.ServiceAuth(
            mesh.identity("orders"), "payments", verify_responses=mesh.keys, on_behalf_of=principal
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(payments_app), base_url="http://payments") as client:
            answer = await client.post("/charges", auth=auth)
        body = json.dumps({"payments": answer.status_code}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    orders_app = MeshAuthMiddleware(
        orders,
        mesh.verifier("orders"),
        policy=meshauth.Policy.from_dict(
            {"delegators": ["gateway"], "rules": [{"callers": ["gateway"], "paths": ["/checkout"]}]}
        ),
        identity=mesh.identity("orders"),
    )
    return orders_app, seen


def _call(app: Any, headers: dict[str, str]) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://orders") as client:
            return await client.post("/checkout", headers=headers)

    return asyncio.run(run())


def test_alice_through_gateway_orders_payments(mesh: Mesh, audit_log: Any) -> None:
    orders_app, seen = _services(mesh)
    # The gateway has verified alice's IdP token and forwards on her behalf, with mutual auth.
    delegated = mesh.identity("gateway").mint("orders", subject="alice")
    nonce = new_nonce()
    response = _call(orders_app, {"Authorization": f"Bearer {delegated}", "Meshauth-Nonce": nonce})
    assert response.status_code == 200 and response.json() == {"payments": 201}
    # orders proved it answered the gateway (hop 2, orders -> payments, was proven by ServiceAuth).
    checker = meshauth.ResponseVerifier("gateway", mesh.keys, clock=mesh.clock)
    assert checker.verify_response(response.headers["meshauth-response"], service="orders", nonce=nonce)

    at_orders, at_payments = seen
    assert (at_orders.caller, at_orders.subject, at_orders.actors) == ("gateway", "alice", ("gateway",))
    assert (at_payments.caller, at_payments.subject, at_payments.actors) == ("orders", "alice", ("orders", "gateway"))

    records = [r for r in audit_log.fields() if r["event"] == "request"]
    assert [(r["audience"], r["caller"], r["subject"], r["actors"]) for r in records] == [
        ("orders", "gateway", "alice", ["gateway"]),
        ("payments", "orders", "alice", ["orders", "gateway"]),
    ]
    assert all(r["outcome"] == "accepted" for r in records)


def test_a_service_not_allowed_to_delegate_is_denied(mesh: Mesh) -> None:
    """billing acting for alice is refused by orders' policy: only the gateway may delegate there."""
    orders_app, seen = _services(mesh)
    token = mesh.identity("billing").mint("orders", subject="alice")

    response = _call(orders_app, {"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert response.json()["reason"] == "delegation_not_allowed"
    assert seen == []


def test_a_forged_chain_is_rejected(mesh: Mesh) -> None:
    """orders claiming an actor chain whose outermost actor is the gateway: issuer_mismatch, 401."""
    import base64

    key = mesh.signing_keys["orders"]
    now = int(mesh.clock())
    header = {"alg": "ES256", "kid": key.kid, "typ": "meshauth+jwt"}
    claims = {"iss": "orders", "sub": "alice", "aud": "payments", "iat": now, "exp": now + 60, "jti": "x" * 22,
              "act": {"sub": "gateway"}}  # fmt: skip

    def segment(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    signing_input = f"{segment(header)}.{segment(claims)}"
    token = f"{signing_input}.{base64.urlsafe_b64encode(key.sign(signing_input.encode())).rstrip(b'=').decode()}"
    with pytest.raises(meshauth.IssuerMismatch):
        mesh.verifier("payments").verify(token)
