"""meshauth.fastapi: RequirePrincipal, CurrentPrincipal and get_principal behind the ASGI middleware."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, WebSocket
from txn_support import in_transaction

import meshauth
from meshauth.asgi import MeshAuthMiddleware
from meshauth.fastapi import CurrentPrincipal, RequirePrincipal, get_principal
from meshauth.testing import Mesh

NONCE = "fastapi-nonce-0123456789"


def build(mesh: Mesh, **middleware: Any) -> tuple[FastAPI, list[str]]:
    api = FastAPI()
    handled: list[str] = []
    charges_writer = RequirePrincipal(callers=["orders", "billing-*"], scopes=["charges:write"], realm="payments")

    @api.get("/whoami")
    def whoami(principal: CurrentPrincipal) -> dict[str, Any]:
        handled.append("whoami")
        return {"caller": principal.caller, "subject": principal.subject, "txn_issuer": principal.txn_issuer}

    @api.post("/charges")
    def charge(principal: meshauth.Principal = Depends(charges_writer)) -> dict[str, str]:  # noqa: B008 - FastAPI idiom
        handled.append("charge")
        return {"charged_by": principal.caller}

    @api.get("/healthz")
    def healthz(principal: meshauth.Principal | None = Depends(get_principal)) -> dict[str, Any]:  # noqa: B008
        handled.append("healthz")
        return {"ok": True, "principal": principal is not None}

    @api.get("/public/needs-auth")
    def misconfigured(principal: CurrentPrincipal) -> dict[str, str]:
        handled.append("misconfigured")
        return {"caller": principal.caller}

    @api.websocket("/stream")
    async def stream(websocket: WebSocket, principal: CurrentPrincipal) -> None:
        handled.append("stream")
        await websocket.accept()
        await websocket.send_json({"caller": principal.caller})
        await websocket.close()

    api.add_middleware(
        MeshAuthMiddleware, verifier=mesh.verifier("payments"), exclude=["/healthz", "/public/*"], **middleware
    )
    return api, handled


def call(app: Any, method: str, path: str, headers: Sequence[tuple[str, str]] = ()) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://payments.internal") as http:
            return await http.request(method, path, headers=list(headers))

    return asyncio.run(go())


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def test_current_principal(mesh: Mesh) -> None:
    api, handled = build(mesh)
    response = call(api, "GET", "/whoami", list(in_transaction(mesh, "orders", "payments").items()))
    assert response.json() == {"caller": "orders", "subject": "alice", "txn_issuer": "gateway"}
    assert handled == ["whoami"]


def test_middleware_refuses_before_fastapi_routes(mesh: Mesh) -> None:
    api, handled = build(mesh)
    response = call(api, "GET", "/whoami")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="payments"'
    assert response.json() == {"error": "unauthorized", "reason": "missing_credentials"}
    assert handled == []


def test_require_principal_checks_callers_and_scopes(mesh: Mesh) -> None:
    api, handled = build(mesh)
    mesh.add_service("billing-eu")
    ok = mesh.identity("orders").mint("payments", scope="charges:write")
    assert call(api, "POST", "/charges", bearer(ok)).json() == {"charged_by": "orders"}
    glob = mesh.identity("billing-eu").mint("payments", scope=["charges:write", "other"])
    assert call(api, "POST", "/charges", bearer(glob)).json() == {"charged_by": "billing-eu"}

    unscoped = call(api, "POST", "/charges", bearer(mesh.identity("orders").token_for("payments")))
    assert unscoped.status_code == 403
    assert unscoped.headers["www-authenticate"] == (
        'Bearer realm="payments", error="insufficient_scope", scope="charges:write"'
    )
    assert unscoped.json() == {"detail": {"error": "insufficient_scope", "reason": "insufficient_scope"}}

    stranger = mesh.identity("gateway").mint("payments", scope="charges:write")
    refused = call(api, "POST", "/charges", bearer(stranger))
    assert refused.status_code == 403
    assert "www-authenticate" not in refused.headers
    assert refused.json() == {"detail": {"error": "forbidden", "reason": "caller_not_allowed"}}
    assert handled == ["charge", "charge"]


def test_excluded_path_without_principal(mesh: Mesh) -> None:
    api, handled = build(mesh)
    assert call(api, "GET", "/healthz").json() == {"ok": True, "principal": False}
    # a route that requires a principal on an excluded path fails closed
    response = call(api, "GET", "/public/needs-auth")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"detail": {"error": "unauthorized", "reason": "missing_credentials"}}
    assert handled == ["healthz"]


def test_dependency_refusal_still_carries_response_token(mesh: Mesh) -> None:
    api, _ = build(mesh, identity=mesh.identity("payments"))
    token = mesh.identity("gateway").token_for("payments")
    response = call(api, "POST", "/charges", [*bearer(token), ("Meshauth-Nonce", NONCE)])
    assert response.status_code == 403
    checker = meshauth.ResponseVerifier("gateway", mesh.keys, clock=mesh.clock)
    assert checker.verify_response(response.headers["meshauth-response"], service="payments", nonce=NONCE)


def test_websocket_route(mesh: Mesh) -> None:
    api, handled = build(mesh)
    token = mesh.identity("orders").token_for("payments")
    sent: list[dict[str, Any]] = []

    async def go(headers: list[tuple[bytes, bytes]]) -> None:
        incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]

        async def receive() -> dict[str, Any]:
            return incoming.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": "/stream",
            "raw_path": b"/stream",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "subprotocols": [],
        }
        await api(scope, receive, send)

    asyncio.run(go([(b"authorization", f"Bearer {token}".encode())]))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == '{"caller":"orders"}'
    sent.clear()
    asyncio.run(go([]))
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "missing_credentials"}]
    assert handled == ["stream"]


def test_require_principal_validates_arguments() -> None:
    with pytest.raises(TypeError):
        RequirePrincipal(callers="orders")
    with pytest.raises(ValueError, match="scopes"):
        RequirePrincipal(scopes=["a b"])
    assert "orders" in repr(RequirePrincipal(callers=["orders"]))


def test_openapi_declares_the_bearer_scheme_and_scopes(mesh: Mesh) -> None:
    from fastapi import Security

    api, _ = build(mesh)

    @api.post("/refunds")
    def refund(
        principal: meshauth.Principal = Security(RequirePrincipal(), scopes=["refunds:write"]),  # noqa: B008
    ) -> dict[str, str]:
        return {"refunded_by": principal.caller}

    schema = api.openapi()
    assert schema["components"]["securitySchemes"]["meshauth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A meshauth service token: `Authorization: Bearer <token>` (see meshauth.ServiceAuth).",
    }
    assert schema["paths"]["/whoami"]["get"]["security"] == [{"meshauth": []}]
    assert schema["paths"]["/refunds"]["post"]["security"] == [{"meshauth": ["refunds:write"]}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_security_scopes_are_required(mesh: Mesh) -> None:
    from fastapi import Security

    api, _ = build(mesh)

    @api.post("/refunds")
    def refund(
        principal: meshauth.Principal = Security(RequirePrincipal(realm="payments"), scopes=["refunds:write"]),  # noqa: B008
    ) -> dict[str, str]:
        return {"refunded_by": principal.caller}

    orders = mesh.identity("orders")
    refused = call(api, "POST", "/refunds", bearer(orders.mint("payments", scope="charges:write")))
    assert refused.status_code == 403
    assert refused.json() == {"detail": {"error": "insufficient_scope", "reason": "insufficient_scope"}}
    assert 'scope="refunds:write"' in refused.headers["WWW-Authenticate"]
    allowed = call(api, "POST", "/refunds", bearer(orders.mint("payments", scope="refunds:write")))
    assert allowed.status_code == 200 and allowed.json() == {"refunded_by": "orders"}
