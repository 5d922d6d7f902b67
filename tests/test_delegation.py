"""gateway -> orders -> payments for alice, inside one transaction, with mutual auth on every hop.

The gateway issues one Transaction Token (Txn-Token) per user request; every hop forwards it unchanged
and binds its own service token to it (``tth``). The transaction id must be visible in each service's
Principal and in each service's audit record; a service cannot invent a user.
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

PAYMENTS_POLICY = {
    "delegators": ["gateway", "orders"],
    "rules": [{"callers": ["orders"], "subjects": ["alice"], "paths": ["/charges"]}],
}


def _payments(mesh: Mesh, seen: list[meshauth.Principal]) -> Any:
    async def payments(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["meshauth.principal"])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"charged"})

    return MeshAuthMiddleware(
        payments,
        mesh.verifier("payments"),
        policy=meshauth.Policy.from_dict(PAYMENTS_POLICY),
        identity=mesh.identity("payments"),
    )


def _services(mesh: Mesh) -> tuple[Any, Any, list[meshauth.Principal]]:
    seen: list[meshauth.Principal] = []
    payments_app = _payments(mesh, seen)

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
    return orders_app, payments_app, seen


def _call(app: Any, path: str, headers: dict[str, str] | list[tuple[str, str]]) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://svc") as client:
            return await client.post(path, headers=headers)

    return asyncio.run(run())


def _from_gateway(mesh: Mesh, audience: str, subject: str = "alice") -> tuple[str, str]:
    """What the gateway sends after verifying ``subject``'s IdP token: its service token and the Txn-Token."""
    gateway = mesh.identity("gateway")
    txn = gateway.issue_txn_token(subject, scope="orders:write", context={"groups": ["staff"]})
    return gateway.token_for(audience, txn_token=txn), txn


def test_alice_through_gateway_orders_payments(mesh: Mesh, audit_log: Any) -> None:
    orders_app, _, seen = _services(mesh)
    token, txn = _from_gateway(mesh, "orders")
    nonce = new_nonce()
    response = _call(
        orders_app, "/checkout", {"Authorization": f"Bearer {token}", "Txn-Token": txn, "Meshauth-Nonce": nonce}
    )
    assert response.status_code == 200 and response.json() == {"payments": 201}
    checker = meshauth.ResponseVerifier("gateway", mesh.keys, clock=mesh.clock)
    assert checker.verify_response(response.headers["meshauth-response"], service="orders", nonce=nonce)

    at_orders, at_payments = seen
    assert (at_orders.caller, at_orders.subject, at_orders.txn_issuer) == ("gateway", "alice", "gateway")
    assert (at_payments.caller, at_payments.subject, at_payments.txn_issuer) == ("orders", "alice", "gateway")
    assert at_orders.transaction == at_payments.transaction and at_orders.transaction is not None
    assert at_payments.txn_token == txn  # forwarded unchanged
    assert at_payments.scopes == frozenset({"orders:write"}) and at_payments.context == {"groups": ("staff",)}
    assert txn not in repr(at_payments)

    records = [r for r in audit_log.fields() if r["event"] == "request"]
    assert [(r["audience"], r["caller"], r["subject"], r["txn_issuer"]) for r in records] == [
        ("orders", "gateway", "alice", "gateway"),
        ("payments", "orders", "alice", "gateway"),
    ]
    assert {r["transaction"] for r in records} == {at_orders.transaction}
    assert all(r["outcome"] == "accepted" for r in records)
    assert all(txn not in json.dumps(r) for r in records)


def test_a_service_not_allowed_to_delegate_is_denied(mesh: Mesh) -> None:
    """billing forwarding alice's genuine Txn-Token to orders: only the gateway may call orders in a transaction."""
    orders_app, _, seen = _services(mesh)
    _, txn = _from_gateway(mesh, "orders")
    token = mesh.identity("billing").token_for("orders", txn_token=txn)
    response = _call(orders_app, "/checkout", {"Authorization": f"Bearer {token}", "Txn-Token": txn})
    assert response.status_code == 403
    assert response.json()["reason"] == "delegation_not_allowed"
    assert seen == []


def test_the_exploit_orders_acting_for_ceo_on_its_own_is_refused(mesh: Mesh) -> None:
    """Version 1 accepted orders.mint("payments", subject="ceo", actors=("gateway",)). Every way now fails."""
    seen: list[meshauth.Principal] = []
    payments_app = _payments(mesh, seen)
    orders = mesh.identity("orders")
    # 1. The old way: the keyword arguments are gone.
    with pytest.raises(TypeError):
        orders.mint("payments", subject="ceo", actors=("gateway",))  # type: ignore[call-arg]
    # 2. Its own Txn-Token for ceo: orders is not a trusted issuer.
    forged = orders.issue_txn_token("ceo", scope="charges:write")
    token = orders.mint("payments", txn_token=forged)
    response = _call(payments_app, "/charges", {"Authorization": f"Bearer {token}", "Txn-Token": forged})
    assert (response.status_code, response.json()["reason"]) == (401, "untrusted_txn_issuer")
    # 3. A genuine Txn-Token of another transaction (alice's), bound by orders, re-labelled: the gateway signed alice.
    _, alice_txn = _from_gateway(mesh, "orders")
    header, payload, signature = alice_txn.split(".")
    claims = json.loads(meshauth._jws.b64url_decode(payload, "payload"))
    claims["sub"] = "ceo"
    altered = f"{header}.{meshauth._jws.b64url_encode(json.dumps(claims).encode())}.{signature}"
    token = orders.mint("payments", txn_token=altered)
    response = _call(payments_app, "/charges", {"Authorization": f"Bearer {token}", "Txn-Token": altered})
    assert (response.status_code, response.json()["reason"]) == (401, "bad_signature")
    # 4. Alice's genuine Txn-Token with a service token bound to another one.
    token = orders.mint("payments", txn_token=forged)
    response = _call(payments_app, "/charges", {"Authorization": f"Bearer {token}", "Txn-Token": alice_txn})
    assert (response.status_code, response.json()["reason"]) == (401, "txn_mismatch")
    # 5. A hand-made service token carrying a user and an act chain.
    handmade = _sign(mesh, "orders", {"sub": "ceo", "act": {"sub": "orders", "act": {"sub": "gateway"}}})
    response = _call(payments_app, "/charges", {"Authorization": f"Bearer {handmade}"})
    assert (response.status_code, response.json()["reason"]) == (401, "invalid_claim")
    assert seen == []


def _sign(mesh: Mesh, issuer: str, extra: dict[str, Any], *, typ: str = "meshauth+jwt", aud: str = "payments") -> str:
    key = mesh.signing_keys[issuer]
    now = int(mesh.clock())
    header = {"alg": "ES256", "kid": key.kid, "typ": typ}
    claims = {"iss": issuer, "sub": issuer, "aud": aud, "iat": now, "exp": now + 60, "jti": "x" * 22, **extra}
    signing_input = (
        f"{meshauth._jws.b64url_encode(json.dumps(header).encode())}."
        f"{meshauth._jws.b64url_encode(json.dumps(claims).encode())}"
    )
    return f"{signing_input}.{meshauth._jws.b64url_encode(key.sign(signing_input.encode()))}"


def test_a_forged_actor_chain_is_an_invalid_claim(mesh: Mesh) -> None:
    token = _sign(mesh, "orders", {"sub": "alice", "act": {"sub": "gateway"}})
    with pytest.raises(meshauth.InvalidClaim):
        mesh.verifier("payments").verify(token)
    with pytest.raises(meshauth.InvalidClaim, match="'act'"):
        mesh.verifier("payments").verify(_sign(mesh, "orders", {"act": {"sub": "orders"}}))


def test_two_txn_token_headers_are_malformed(mesh: Mesh) -> None:
    seen: list[meshauth.Principal] = []
    payments_app = _payments(mesh, seen)
    token, txn = _from_gateway(mesh, "payments")
    headers = [("Authorization", f"Bearer {token}"), ("Txn-Token", txn), ("Txn-Token", txn)]
    response = _call(payments_app, "/charges", headers)
    assert (response.status_code, response.json()["reason"]) == (401, "malformed")
    assert seen == []
